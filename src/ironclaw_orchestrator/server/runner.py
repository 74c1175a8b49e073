"""Running the host agent: bind its sockets, adopt VMs, serve with uvicorn, drain on SIGTERM.

Listeners are bound here, not by uvicorn, so that the Unix socket never exists with a mode
wider than 0600 (uvicorn would ``chmod 0666``), and so that a second agent on the same
socket is refused before it touches anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ..detach import reap_supervisors
from ..errors import ConfigError, UsageError
from ..registry import STATE_DIR_ENV
from ..vm.rundir import RUN_DIR_ENV
from .agent import HostAgent
from .app import create_app
from .settings import AgentSettings, read_token

if TYPE_CHECKING:
    import uvicorn

__all__ = ["bind_tcp", "bind_unix", "serve"]

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 2.0
GRACEFUL_SHUTDOWN_S = 5


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the start (root only).

    A stale socket file (nobody answers) is replaced; a live one means another agent runs
    there (``UsageError``); anything else at ``path`` is refused (``ConfigError``).
    """
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(
                f"--socket {path} exists and is not a socket; remove it or pick another path"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: its agent is gone
        else:
            raise UsageError(
                f"another host agent is listening on {path}; stop it first or pass --socket"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind the agent socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise ConfigError(f"cannot listen on --tcp {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _agent_server(config: uvicorn.Config, agent: HostAgent) -> uvicorn.Server:
    """uvicorn, but SIGTERM drains: stop admitting, let starts in flight finish, exit 0.

    Running VMs are left to their supervisors; SIGINT (Ctrl-C) stops at once, likewise
    leaving every VM running. (uvicorn is imported here: it pulls in click, which only the
    CLI may load at import time.)
    """
    import uvicorn

    class AgentServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self.loop = asyncio.get_running_loop()
            self.drain_task: asyncio.Task[None] | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if sig == signal.SIGTERM:
                if self.drain_task is None:
                    self.loop.call_soon_threadsafe(self._start_drain)
                return
            super().handle_exit(sig, frame)

        def _start_drain(self) -> None:
            if self.drain_task is None:
                log.warning(
                    "SIGTERM: draining (no new VMs); running VMs stay with their supervisors"
                )
                self.drain_task = asyncio.ensure_future(self._drain())

        async def _drain(self) -> None:
            await agent.drain(agent.settings.drain_timeout_s)
            self.should_exit = True

    return AgentServer()


async def _reaper(agent: HostAgent) -> None:
    """Reap exited supervisors (no zombies) and sweep hand-over files of failed spawns."""
    while True:
        await asyncio.sleep(REAP_INTERVAL_S)
        reap_supervisors()
        await asyncio.to_thread(agent.sweep_spawn_files)


async def _serve(
    settings: AgentSettings, sockets: list[socket.socket], token: bytes | None
) -> None:
    agent = HostAgent(settings)
    await agent.startup()
    import uvicorn

    app = create_app(agent, token=token)
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _agent_server(config, agent)
    reaper = asyncio.ensure_future(_reaper(agent))
    try:
        await server.serve(sockets=sockets)
    finally:
        reaper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reaper


def serve(settings: AgentSettings) -> None:
    """Run the agent until SIGTERM (drain) or SIGINT. Raises ``IronclawError`` on bad set-up.

    The token file is read and every listener bound before anything else, so a bad flag
    or a busy socket fails fast with nothing changed.
    """
    token: bytes | None = None
    if settings.tcp is not None:
        if settings.token_file is None:
            raise ConfigError(
                "--tcp needs --token-file: the agent never listens on TCP without a bearer token"
            )
        token = read_token(settings.token_file)
    if os.geteuid() != 0:
        raise UsageError("ironclaw serve must run as root (the jailer needs it)")
    # Supervisors inherit the environment: they must agree on where state and run dirs are.
    os.environ[STATE_DIR_ENV] = str(settings.state_dir)
    os.environ[RUN_DIR_ENV] = str(settings.run_dir)
    sockets = [bind_unix(settings.socket_path)]
    try:
        address = settings.tcp_address()
        if address is not None:
            sockets.append(bind_tcp(*address))
        asyncio.run(_serve(settings, sockets, token))
    finally:
        for sock in sockets:
            sock.close()
        with contextlib.suppress(OSError):
            settings.socket_path.unlink()
