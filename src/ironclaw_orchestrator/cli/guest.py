"""``ironclaw vm exec`` and ``ironclaw vm cp``: commands and files in a running VM's guest.

The VM is found in the registry (``ironclaw vm start -d`` records it with its jail); its
guest agent is reached over the VM's vsock socket inside the jail. ``--agent unix:PATH``
talks to an agent on this host instead (``ironclaw-agent --listen unix:PATH``), which is
how to try an image's commands without a VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import typer

from .. import names
from ..agent import AgentClient, ExecExit, ExecOutput, ExecStarted, ExecTruncated, FileTransfer
from ..agent.protocol import DEFAULT_VSOCK_PORT
from ..agent.vmhandle import vsock_host_path
from ..registry import Registry
from .common import ExitCode, fail, handle_errors, stderr
from .summaries import help_text

EXEC_HELP = help_text(
    "vm exec",
    "Examples:\n\n"
    "  ironclaw vm exec web-1 -- uname -a\n\n"
    "  ironclaw vm exec web-1 --timeout 60 --env CI=1 --cwd /src -- make test\n\n"
    "  echo data | ironclaw vm exec web-1 -i -- sha256sum",
)
CP_HELP = help_text(
    "vm cp",
    "Examples:\n\n"
    "  ironclaw vm cp ./script.sh web-1:/tmp/script.sh\n\n"
    "  ironclaw vm cp web-1:/var/log/app.log .",
)

AgentOption = Annotated[
    str | None,
    typer.Option(
        "--agent",
        help="Talk to the agent at unix:PATH instead of the VM's vsock (VM_ID is then ignored).",
    ),
]
PortOption = Annotated[
    int, typer.Option("--port", help="Guest vsock port of the agent.")
]  # fmt: skip


def _vsock_path(vm_id: str) -> Path:
    record = Registry().get(vm_id)
    if record is None:
        fail(f"no VM {vm_id!r} in the registry: see `ironclaw vm ls` (or pass --state-dir)")
    config = record.config or {}
    if record.jail_dir is None or config.get("vsock_guest_cid") is None:
        fail(
            f"VM {vm_id} has no vsock device (or runs unjailed), which the guest agent needs: "
            "start it with vsock_guest_cid set (e.g. `vsock_guest_cid = 3` in its TOML config)"
        )
    return vsock_host_path(
        names.chroot_dir(record.jail_dir), config.get("vsock_uds_path") or "/run/vsock.sock"
    )


@asynccontextmanager
async def _client(vm_id: str, agent: str | None, port: int) -> AsyncIterator[AgentClient]:
    if agent is not None:
        if not agent.startswith("unix:"):
            fail(f"--agent {agent!r}: use unix:PATH")
        client = await AgentClient.connect_unix(agent.removeprefix("unix:"))
    else:
        client = await AgentClient.connect_vsock(_vsock_path(vm_id), port)
    try:
        yield client
    finally:
        await client.close()


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env {pair!r}: use KEY=VALUE")
        env[key] = value
    return env


def exec_(
    vm_id: Annotated[str, typer.Argument(metavar="VM_ID", help="The VM (see `ironclaw vm ls`).")],
    command: Annotated[list[str], typer.Argument(metavar="-- CMD...", help="Command and args.")],
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Kill the command's process group after S s.")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeatable).")
    ] = None,
    cwd: Annotated[
        str | None, typer.Option("--cwd", help="Working directory in the guest.")
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", "-u", help="Run as this guest user.")
    ] = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", "-i", help="Send this program's stdin.")
    ] = False,
    agent: AgentOption = None,
    port: PortOption = DEFAULT_VSOCK_PORT,
) -> None:
    env_map = _parse_env(env or [])
    data = sys.stdin.buffer.read() if stdin else None
    with handle_errors():
        code = asyncio.run(_exec(vm_id, command, timeout, env_map, cwd, user, data, agent, port))
    raise typer.Exit(code)


async def _exec(
    vm_id: str,
    command: list[str],
    timeout: float | None,
    env: dict[str, str],
    cwd: str | None,
    user: str | None,
    data: bytes | None,
    agent: str | None,
    port: int,
) -> int:
    out = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    async with _client(vm_id, agent, port) as client:
        exec_id = ""
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task[None]] = set()

        def interrupt() -> None:  # Ctrl-C reaches the guest command, not just us
            if exec_id:
                task = loop.create_task(client.signal(exec_id, signal.SIGINT))
                pending.add(task)
                task.add_done_callback(pending.discard)

        # Not possible off the main thread (embedded use): then Ctrl-C is not forwarded.
        with contextlib.suppress(ValueError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, interrupt)
        try:
            async for event in client.exec_stream(
                command, env=env or None, cwd=cwd, stdin=data, timeout_s=timeout, user=user
            ):
                if isinstance(event, ExecStarted):
                    exec_id = event.exec_id
                elif isinstance(event, ExecOutput):
                    out[event.stream].write(event.data)
                    out[event.stream].flush()
                elif isinstance(event, ExecTruncated):
                    stderr.print(
                        f"[yellow]ironclaw: {event.stream} truncated at {event.limit} bytes[/]"
                    )
                elif isinstance(event, ExecExit):
                    if event.timed_out:
                        stderr.print(
                            f"[yellow]ironclaw: timed out after {timeout} s: the command's "
                            "process group was killed[/]"
                        )
                    return event.exit_code
        finally:
            loop.remove_signal_handler(signal.SIGINT)
    return int(ExitCode.VM_ERROR)


def _split(spec: str) -> tuple[str, str] | None:
    """``VM_ID:/path`` -> ``(VM_ID, /path)``; a local path -> ``None``."""
    vm_id, sep, path = spec.partition(":")
    if sep and path.startswith("/") and vm_id and "/" not in vm_id:
        return vm_id, path
    return None


def cp(
    src: Annotated[str, typer.Argument(help="Local path or VM_ID:/guest/path.")],
    dst: Annotated[str, typer.Argument(help="Local path or VM_ID:/guest/path.")],
    mode: Annotated[
        str | None, typer.Option("--mode", help="Octal mode for a file copied into the guest.")
    ] = None,
    agent: AgentOption = None,
    port: PortOption = DEFAULT_VSOCK_PORT,
) -> None:
    guest_src, guest_dst = _split(src), _split(dst)
    if (guest_src is None) == (guest_dst is None):
        fail("exactly one of SRC and DST must be VM_ID:/absolute/guest/path")
    try:
        file_mode = int(mode, 8) if mode is not None else None
    except ValueError:
        fail(f"--mode {mode!r} is not an octal mode like 644")
    with handle_errors():
        done = asyncio.run(_cp(guest_src, guest_dst, src, dst, file_mode, agent, port))
    stderr.print(f"copied {done.size} bytes, sha256 {done.sha256}")


async def _cp(
    guest_src: tuple[str, str] | None,
    guest_dst: tuple[str, str] | None,
    src: str,
    dst: str,
    mode: int | None,
    agent: str | None,
    port: int,
) -> FileTransfer:
    if guest_dst is not None:
        async with _client(guest_dst[0], agent, port) as client:
            return await client.put_file(Path(src), guest_dst[1], mode=mode)
    assert guest_src is not None
    async with _client(guest_src[0], agent, port) as client:
        return await client.get_file(guest_src[1], Path(dst))


__all__ = ["CP_HELP", "EXEC_HELP", "cp", "exec_"]
