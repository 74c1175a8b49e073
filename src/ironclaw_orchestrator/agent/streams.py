"""Host side: following one command's output stream and refusing what does not add up.

The tracker knows how many bytes of each stream it has received; an ``out`` message must
continue exactly there and stay within the limit the client asked for, so a broken or
hostile agent can neither repeat, skip nor inflate output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import AgentProtocolError, ConfigError
from . import messages as m
from .protocol import Message

MAX_OUTPUT_LIMIT = 256 * 1024 * 1024


class OutputTracker:
    """Turns the agent's messages for one command into events, checking each."""

    def __init__(
        self, where: str, offsets: tuple[int, int], limit: int, exec_id: str | None
    ) -> None:
        self.where = where
        self.received = [offsets[0], offsets[1]]
        self.limit = limit
        self.exec_id = exec_id
        self.marked: set[int] = set()
        self.announced = False

    def accept(self, msg: Message, payload: bytes) -> m.ExecEvent | None:
        """The event for one message (``None`` for one already reported before a retry)."""
        got = m.parse(msg, m.StartedMsg, m.OutMsg, m.TruncatedMsg, m.ExitMsg, where=self.where)
        if isinstance(got, m.StartedMsg):
            if self.exec_id is not None and got.exec_id != self.exec_id:
                raise AgentProtocolError(
                    f"{self.where}: asked for command {self.exec_id} but the agent answered "
                    f"for {got.exec_id}"
                )
            self.exec_id = got.exec_id
            if self.announced:
                return None  # a resumed stream after a reconnect
            self.announced = True
            return m.ExecStarted(got.exec_id, got.pid, got.reused)
        if not self.announced:
            raise AgentProtocolError(f"{self.where}: command output before 'started'")
        if isinstance(got, m.OutMsg):
            i = got.fd - 1
            if got.offset != self.received[i] or not payload:
                raise AgentProtocolError(
                    f"{self.where}: {m.STREAMS[got.fd]} chunk at offset {got.offset} "
                    f"({len(payload)} bytes), expected offset {self.received[i]}"
                )
            if got.offset + len(payload) > self.limit:
                raise AgentProtocolError(
                    f"{self.where}: {m.STREAMS[got.fd]} exceeds the {self.limit}-byte limit "
                    "the host asked for"
                )
            self.received[i] += len(payload)
            return m.ExecOutput(m.STREAMS[got.fd], payload, got.offset)
        if isinstance(got, m.TruncatedMsg):
            if got.fd in self.marked:
                return None
            self.marked.add(got.fd)
            return m.ExecTruncated(m.STREAMS[got.fd], self.limit)
        assert isinstance(got, m.ExitMsg)
        if got.exec_id != self.exec_id:
            raise AgentProtocolError(f"{self.where}: exit of {got.exec_id}, not {self.exec_id}")
        return m.exit_event(got)


def exec_request(
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    cwd: str | None,
    stdin: bytes | None,
    timeout_s: float | None,
    user: str | None,
    output_limit: int,
) -> Message:
    if isinstance(argv, str | bytes) or not argv or not all(isinstance(a, str) for a in argv):
        raise ConfigError(f"exec: argv must be a non-empty list of strings, got {argv!r}")
    if timeout_s is not None and not timeout_s > 0:
        raise ConfigError(f"exec: timeout_s must be positive, got {timeout_s!r}")
    if not 0 <= output_limit <= MAX_OUTPUT_LIMIT:
        raise ConfigError(f"exec: output_limit must be 0 .. 256 MiB, got {output_limit!r}")
    if env is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise ConfigError("exec: env must map strings to strings")
    request: Message = {"t": "exec", "argv": list(argv), "output_limit": output_limit}
    if env is not None:
        request["env"] = dict(env)
    for key, value in (("cwd", cwd), ("user", user), ("timeout_s", timeout_s)):
        if value is not None:
            request[key] = value
    if stdin is not None:
        request["stdin"] = True
    return request
