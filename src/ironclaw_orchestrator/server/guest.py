"""Commands and files in a VM through its guest agent (``/v1/vms/{id}/exec``, ``/files``).

The host agent finds the VM's vsock socket from its registry record, exactly as
``ironclaw vm exec`` does, and drives the guest agent with the library's
:class:`~ironclaw_orchestrator.agent.AgentClient`: the command's exit code, output (up to
``output_limit`` bytes per stream), signal and timeout come back as one JSON document.
Files travel through a private temporary file on the host (the guest agent's transfers are
atomic and SHA-256 verified at both ends).
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import names
from ..agent import DEFAULT_VSOCK_PORT, AgentClient, ExecResult
from ..agent.vmhandle import vsock_host_path
from ..errors import ConfigError, UsageError
from ..registry import VmRecord

__all__ = [
    "ExecRequest",
    "ExecResponse",
    "TransferResponse",
    "download",
    "run_exec",
    "upload",
    "vsock_path",
]

#: Output kept per stream when the request does not say (the JSON answer holds all of it).
DEFAULT_EXEC_OUTPUT_LIMIT = 4 * 1024 * 1024
MAX_EXEC_OUTPUT_LIMIT = 64 * 1024 * 1024
GUEST_CONNECT_TIMEOUT_S = 10.0


class ExecRequest(BaseModel):
    """A command to run in the guest. ``stdin`` is text; ``stdin_b64`` bytes (one of them)."""

    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1, description="The command and its arguments.")
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    stdin: str | None = None
    stdin_b64: str | None = None
    timeout_s: float | None = Field(
        default=None, gt=0, le=86_400, description="Kill the command's process group after."
    )
    output_limit: int = Field(default=DEFAULT_EXEC_OUTPUT_LIMIT, ge=0, le=MAX_EXEC_OUTPUT_LIMIT)
    #: ``text``: stdout/stderr decoded as UTF-8 (invalid bytes replaced); ``base64``: exact.
    output: Literal["text", "base64"] = "text"


class ExecResponse(BaseModel):
    exit_code: int
    stdout: str
    stderr: str
    #: How ``stdout`` / ``stderr`` are encoded: ``text`` or ``base64``.
    encoding: Literal["text", "base64"]
    signal: int | None
    timed_out: bool
    duration_s: float
    exec_id: str
    stdout_dropped: int
    stderr_dropped: int


class TransferResponse(BaseModel):
    path: str
    size: int
    sha256: str


def vsock_path(record: VmRecord) -> Path:
    """Host path of the VM's vsock socket; ``UsageError`` if it has none (or is unjailed)."""
    config = record.config or {}
    if record.jail_dir is None or config.get("vsock_guest_cid") is None:
        raise UsageError(
            f"VM {record.vm_id} has no vsock device (or runs unjailed), which the guest agent "
            "needs: create it with vsock_guest_cid set (e.g. 3)"
        )
    uds = config.get("vsock_uds_path") or "/run/vsock.sock"
    return vsock_host_path(names.chroot_dir(record.jail_dir), uds)


def _stdin(req: ExecRequest) -> bytes | None:
    if req.stdin is not None and req.stdin_b64 is not None:
        raise ConfigError("invalid exec request:\n  stdin: give stdin or stdin_b64, not both")
    if req.stdin_b64 is not None:
        try:
            return base64.b64decode(req.stdin_b64, validate=True)
        except ValueError:
            raise ConfigError("invalid exec request:\n  stdin_b64: not valid base64") from None
    return None if req.stdin is None else req.stdin.encode()


def _encode(data: bytes, how: str) -> str:
    return base64.b64encode(data).decode() if how == "base64" else data.decode(errors="replace")


async def run_exec(record: VmRecord, req: ExecRequest) -> ExecResponse:
    """Run ``req`` in the VM of ``record`` and wait for it to exit.

    Guest-agent failures are the library's ``AgentError`` family: cannot connect
    (``AgentConnectionError``), refused (``AgentRequestError`` with its code), protocol.
    """
    stdin = _stdin(req)
    client = await AgentClient.connect_vsock(
        vsock_path(record), DEFAULT_VSOCK_PORT, connect_timeout_s=GUEST_CONNECT_TIMEOUT_S
    )
    try:
        result: ExecResult = await client.exec(
            req.argv,
            env=req.env,
            cwd=req.cwd,
            stdin=stdin,
            timeout_s=req.timeout_s,
            user=req.user,
            output_limit=req.output_limit,
        )
    finally:
        await client.close()
    return ExecResponse(
        exit_code=result.exit_code,
        stdout=_encode(result.stdout, req.output),
        stderr=_encode(result.stderr, req.output),
        encoding=req.output,
        signal=result.signal,
        timed_out=result.timed_out,
        duration_s=result.duration_s,
        exec_id=result.exec_id,
        stdout_dropped=result.stdout_dropped,
        stderr_dropped=result.stderr_dropped,
    )


async def _connect(record: VmRecord) -> AgentClient:
    return await AgentClient.connect_vsock(
        vsock_path(record), DEFAULT_VSOCK_PORT, connect_timeout_s=GUEST_CONNECT_TIMEOUT_S
    )


def transfer_file(directory: Path) -> Path:
    """A new private (0600) temporary file in ``directory`` (0700, created if needed)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="transfer-", dir=directory)
    os.close(fd)
    return Path(name)


async def upload(
    record: VmRecord, local: Path, guest_path: str, mode: int | None
) -> TransferResponse:
    """Copy the host file ``local`` to ``guest_path`` in the VM (atomic, verified)."""
    client = await _connect(record)
    try:
        done = await client.put_file(local, guest_path, mode=0o644 if mode is None else mode)
    finally:
        await client.close()
    return TransferResponse(path=guest_path, size=done.size, sha256=done.sha256)


async def download(record: VmRecord, guest_path: str, local: Path, max_bytes: int) -> Path:
    """Copy ``guest_path`` from the VM to ``local``; removes ``local`` if that fails."""
    client = await _connect(record)
    try:
        await client.get_file(guest_path, local, max_bytes=max_bytes)
    except BaseException:
        with contextlib.suppress(OSError):
            local.unlink()
        raise
    finally:
        await client.close()
    return local
