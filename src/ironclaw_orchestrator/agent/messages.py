"""Host side: what the client returns, and strict models of every message an agent may send.

The host never trusts the guest: each message is validated (types, ranges, lengths) before
anything acts on it, and an answer that breaks the rules raises
:class:`~ironclaw_orchestrator.errors.AgentProtocolError` rather than being coerced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import AgentProtocolError, AgentRequestError, TransferIntegrityError
from .protocol import Message

Stream = Literal["stdout", "stderr"]
STREAMS: dict[int, Stream] = {1: "stdout", 2: "stderr"}

ShortStr = Annotated[str, Field(max_length=200)]
ExecId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0, le=2**62)]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class HelloMsg(_Msg):
    t: Literal["hello"]
    proto: Literal["ironclaw-agent"]
    version: int
    agent: ShortStr = "?"


class ErrorMsg(_Msg):
    t: Literal["error"]
    code: Annotated[str, Field(max_length=64)]
    message: Annotated[str, Field(max_length=8192)]


class PongMsg(_Msg):
    t: Literal["pong"]
    agent: ShortStr
    uptime_s: Annotated[float, Field(ge=0)]
    running: Count


class StartedMsg(_Msg):
    t: Literal["started"]
    exec_id: ExecId
    pid: Count
    reused: bool


class OutMsg(_Msg):
    t: Literal["out"]
    fd: Literal[1, 2]
    offset: Count


class TruncatedMsg(_Msg):
    t: Literal["truncated"]
    fd: Literal[1, 2]
    limit: Count


class ExitMsg(_Msg):
    t: Literal["exit"]
    exec_id: ExecId
    exit_code: Annotated[int, Field(ge=0, le=255)]
    signal: Annotated[int, Field(ge=1, le=127)] | None
    timed_out: bool
    duration_s: Annotated[float, Field(ge=0)]
    stdout_dropped: Count
    stderr_dropped: Count


class ReadyMsg(_Msg):
    t: Literal["ready"]


class OkMsg(_Msg):
    t: Literal["ok"]
    size: Count | None = None
    sha256: Sha256 | None = None


class FileMsg(_Msg):
    t: Literal["file"]
    size: Count
    mode: Annotated[int, Field(ge=0, le=0o7777)]


class DataMsg(_Msg):
    t: Literal["data"]


class EndMsg(_Msg):
    t: Literal["end"]
    size: Count
    #: Always there for ``get``; for ``echo`` only when a digest was asked for.
    sha256: Sha256 | None = None


M = TypeVar("M", bound=_Msg)
T = TypeVar("T")
_MODELS: dict[str, type[_Msg]] = {
    m.model_fields["t"].annotation.__args__[0]: m  # type: ignore[union-attr]
    for m in (HelloMsg, PongMsg, StartedMsg, OutMsg, TruncatedMsg, ExitMsg, ReadyMsg, OkMsg,
              FileMsg, DataMsg, EndMsg)
}  # fmt: skip


def parse(msg: Message, *expected: type[_Msg], where: str) -> _Msg:
    """``msg`` as one of the ``expected`` models; an ``error`` message is raised as such."""
    kind = msg.get("t")
    if kind == "error":
        err = _validate(ErrorMsg, msg, where)
        raise AgentRequestError(f"{where}: the agent refused: {err.message}", code=err.code)
    model = _MODELS.get(kind) if isinstance(kind, str) else None
    if model is None or model not in expected:
        names = ", ".join(repr(m.model_fields["t"].annotation.__args__[0]) for m in expected)  # type: ignore[union-attr]
        raise AgentProtocolError(
            f"{where}: expected {names} from the agent, got {str(kind)[:40]!r}"
        )
    return _validate(model, msg, where)


def _validate(model: type[M], msg: Message, where: str) -> M:
    try:
        return model.model_validate(msg)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise AgentProtocolError(
            f"{where}: malformed {model.__name__[:-3].lower()!r} message from the agent "
            f"({loc}: {first['msg']})"
        ) from None


def check_hello(msg: Message, where: str) -> HelloMsg:
    hello = parse(msg, HelloMsg, where=where)
    assert isinstance(hello, HelloMsg)
    return hello


# ---------------------------------------------------------------------- results


@dataclass(frozen=True)
class AgentInfo:
    """What ``ping`` tells about the agent."""

    agent_version: str
    protocol_version: int
    uptime_s: float
    running: int


@dataclass(frozen=True)
class ExecResult:
    """A finished command. ``exit_code`` is 128 + ``signal`` when a signal ended it."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None
    timed_out: bool
    duration_s: float
    exec_id: str = ""
    #: Output beyond the limit was dropped (``*_dropped`` bytes of it).
    stdout_dropped: int = 0
    stderr_dropped: int = 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def truncated(self) -> bool:
        return bool(self.stdout_dropped or self.stderr_dropped)


@dataclass(frozen=True)
class ExecStarted:
    exec_id: str
    pid: int
    reused: bool


@dataclass(frozen=True)
class ExecOutput:
    stream: Stream
    data: bytes
    offset: int


@dataclass(frozen=True)
class ExecTruncated:
    """The stream reached its limit: what follows is dropped (counted in ``ExecExit``)."""

    stream: Stream
    limit: int


@dataclass(frozen=True)
class ExecExit:
    exec_id: str
    exit_code: int
    signal: int | None
    timed_out: bool
    duration_s: float
    stdout_dropped: int
    stderr_dropped: int


ExecEvent = ExecStarted | ExecOutput | ExecTruncated | ExecExit


@dataclass(frozen=True)
class FileTransfer:
    """A verified transfer: both ends computed this size and SHA-256."""

    size: int
    sha256: str


def exit_event(msg: ExitMsg) -> ExecExit:
    return ExecExit(
        msg.exec_id, msg.exit_code, msg.signal, msg.timed_out, msg.duration_s,
        msg.stdout_dropped, msg.stderr_dropped,
    )  # fmt: skip


def integrity(
    where: str, what: str, size: int, sha256: str, their_size: int, their_sha256: str
) -> TransferIntegrityError:
    return TransferIntegrityError(
        f"{where}: {what} failed its end-to-end check: this side has {size} bytes with SHA-256 "
        f"{sha256}, the agent reports {their_size} bytes with {their_sha256}; nothing was kept"
    )
