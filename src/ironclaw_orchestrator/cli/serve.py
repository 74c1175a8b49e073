"""``ironclaw serve``: run the host agent (HTTP+JSON API over a Unix socket, optionally TCP)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from ..registry import default_state_dir
from ..server.settings import DEFAULT_IMAGE_DIR, DEFAULT_SOCKET
from ..vm.config import DEFAULT_CHROOT_BASE
from ..vm.rundir import run_root
from .common import handle_errors
from .summaries import help_text

HELP = help_text(
    "serve",
    "Listens on a Unix socket (mode 0600, root only); with --tcp also on TCP, where every "
    "request needs 'Authorization: Bearer <token>' from --token-file (the agent refuses "
    "to start on TCP without one). VMs belong to their own supervisor processes: stopping "
    "or restarting the agent leaves them running, and on start it re-adopts them and "
    "cleans up the ones that died. SIGTERM drains: no new VMs, starts in flight finish, "
    "then the agent exits.\n\n"
    "A full host refuses with HTTP 429 (host_full, too_many_starting) or 503 (draining).\n\n"
    "Examples:\n\n"
    "sudo ironclaw serve\n\n"
    "sudo ironclaw serve --tcp 10.0.0.5:7070 --token-file /etc/ironclaw/token "
    "--label zone=a\n\n"
    "curl --unix-socket /run/ironclaw/agent.sock http://agent/v1/host",
)


def _labels(values: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label {item!r} must be KEY=VALUE")
        labels[key] = value
    return labels


def serve(
    socket_path: Annotated[
        Path, typer.Option("--socket", help="Unix socket to listen on.")
    ] = DEFAULT_SOCKET,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="VM registry (default: the global --state-dir)."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Run directory root (default /run/ironclaw).")
    ] = None,
    chroot_base: Annotated[
        Path, typer.Option("--chroot-base", help="Where jails are made.")
    ] = DEFAULT_CHROOT_BASE,
    tcp: Annotated[
        str | None, typer.Option("--tcp", help="Also listen on HOST:PORT (needs --token-file).")
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="Bearer token for TCP (mode 0600).")
    ] = None,
    image_dir: Annotated[
        list[Path] | None,
        typer.Option("--image-dir", help=f"Allowed kernel/rootfs dir ({DEFAULT_IMAGE_DIR})."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE reported in /v1/host.")
    ] = None,
    vcpus: Annotated[
        int | None, typer.Option("--capacity-vcpus", help="vCPUs to offer (default: CPUs).")
    ] = None,
    memory: Annotated[
        int | None,
        typer.Option("--capacity-memory", help="MiB to offer (default: RAM minus 1 GiB)."),
    ] = None,
    cpu_overcommit: Annotated[float, typer.Option("--cpu-overcommit")] = 4.0,
    memory_overcommit: Annotated[float, typer.Option("--memory-overcommit")] = 1.0,
    max_starting: Annotated[
        int, typer.Option("--max-starting", help="VMs starting at once before 429.")
    ] = 16,
    allow_unjailed: Annotated[
        bool, typer.Option("--allow-unjailed", help="Development hosts: allow unjailed VMs.")
    ] = False,
) -> None:
    from ..server import AgentSettings
    from ..server import serve as run

    with handle_errors():
        settings = AgentSettings(
            socket_path=socket_path,
            state_dir=state_dir or default_state_dir(),
            run_dir=run_dir or run_root(),
            chroot_base=chroot_base,
            tcp=tcp,
            token_file=token_file,
            image_dirs=tuple(image_dir or [DEFAULT_IMAGE_DIR]),
            labels=_labels(label or []),
            capacity_vcpus=vcpus,
            capacity_memory_mb=memory,
            cpu_overcommit=cpu_overcommit,
            memory_overcommit=memory_overcommit,
            max_starting=max_starting,
            require_sandbox=not allow_unjailed,
        )
        run(settings)
