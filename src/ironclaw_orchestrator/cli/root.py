"""The ``ironclaw`` command tree: the root and ``vm`` groups, their command tables, the root
options (``--verbose``, ``--state-dir``, ``--version``).

Imported by :func:`ironclaw_orchestrator.cli.main` once the garbage collector is paused (see
:mod:`.startup`), or through the package (``from ironclaw_orchestrator.cli import app``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .common import VerboseOption, setup_logging
from .lazy import LazyGroup
from .summaries import help_text

__all__ = ["COMMANDS", "STATE_DIR_HELP", "VM_COMMANDS", "app", "version_text", "vm_app"]

#: ``ironclaw <name>``: the module of this package and the command function (help attribute).
COMMANDS: dict[str, str] = {
    "doctor": "doctor:doctor:HELP",
    "install": "install:install:HELP",
    "gc": "gc:gc:HELP",
    "serve": "serve:serve:HELP",
    "vm": ":vm_app",
    "image": "image:app",
    "security": "security:app",
}

#: ``ironclaw vm <name>``, same form.
VM_COMMANDS: dict[str, str] = {
    "run": "vm:run:RUN_HELP",
    "start": "detached:start:START_HELP",
    "ls": "vm_list:ls:LS_HELP",
    "stats": "vm_list:stats:STATS_HELP",
    "logs": "vm_stop:logs:LOGS_HELP",
    "stop": "vm_stop:stop:STOP_HELP",
    "exec": "guest:exec_:EXEC_HELP",
    "cp": "guest:cp:CP_HELP",
    "pause": "snapshot:pause:PAUSE_HELP",
    "resume": "snapshot:resume:RESUME_HELP",
    "snapshot": "snapshot:snapshot:SNAPSHOT_HELP",
    "restore": "snapshot:restore:RESTORE_HELP",
}

#: Help of ``--state-dir``; the variable and default are registry.STATE_DIR_ENV and
#: DEFAULT_STATE_DIR (not imported here: the registry pulls in pydantic; a unit test checks).
STATE_DIR_HELP = (
    "VM registry directory (sets $IRONCLAW_STATE_DIR; default /run/ironclaw/registry as root, "
    "else $XDG_RUNTIME_DIR/ironclaw/registry or ~/.local/state/ironclaw/registry)."
)


class _RootGroup(LazyGroup):
    lazy_commands = COMMANDS


class _VmGroup(LazyGroup):
    lazy_commands = VM_COMMANDS
    summary_key = "vm "


app = typer.Typer(
    name="ironclaw",
    cls=_RootGroup,
    help=(
        "Run untrusted workloads in Firecracker microVMs, sandboxed by the Jailer.\n\n"
        "Examples:\n\n"
        "  ironclaw doctor            # can this host run jailed VMs?\n\n"
        "  ironclaw install           # install firecracker + jailer\n\n"
        "  ironclaw vm run            # boot the built-in probe guest\n\n"
        "  ironclaw vm start -d       # ... detached; then vm ls / stats / logs / stop\n\n"
        "  ironclaw gc                # clean up after crashed or killed VMs"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

vm_app = typer.Typer(
    cls=_VmGroup,
    help=help_text(
        "vm",
        "Examples:\n\n"
        "  ironclaw vm run --probe halt\n\n"
        "  ironclaw vm start -d --id web-1\n\n"
        "  ironclaw vm ls\n\n"
        "  ironclaw vm stop web-1",
    ),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_text() -> str:
    """``ironclaw --version``: our version, then each binary found (path and version)."""
    from ..errors import IronclawError
    from ..version import __version__
    from ..vm.binaries import find_firecracker, find_jailer, read_version

    lines = [f"ironclaw-orchestrator {__version__}"]
    for name, finder in (("firecracker", find_firecracker), ("jailer", find_jailer)):
        try:
            path = finder()
        except IronclawError:
            hint = f"run `ironclaw install` or set IRONCLAW_{name.upper()}"
            lines.append(f"{name}: not found ({hint})")
            continue
        try:
            found = f"{read_version(path, name)} ({path})"
        except IronclawError as exc:
            found = f"{path}: version unknown: {str(exc).splitlines()[0]}"
        lines.append(f"{name}: {found}")
    return "\n".join(lines)


def _print_version(value: bool) -> None:
    if value:
        print(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    verbose: VerboseOption = False,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help=STATE_DIR_HELP, show_default=False),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="Print the version and the firecracker/jailer found, then exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    setup_logging(verbose)
    if state_dir is not None:
        from ..registry import STATE_DIR_ENV

        # The environment, so that everything started from here (supervisors) agrees.
        os.environ[STATE_DIR_ENV] = str(state_dir.absolute())
