"""The ``ironclaw`` command line (typer): ``doctor``, ``install``, ``vm ...`` and ``gc``.

One module per command group; :mod:`.root` holds the command tree (``app``, the tables),
:mod:`.common` exit codes, error output, logging and TOML loading. This package is the only
place that imports typer or rich.

Start-up cost: the commands are listed in :data:`COMMANDS` and :data:`VM_COMMANDS` and their
modules are imported only when one of them runs (:mod:`.lazy`), so ``ironclaw vm run``
imports the VM code but not the installer, gc or the detached-VM code. Register a command with
one line in the table of its group (in :mod:`.root`): ``"name": "module:function:HELP_ATTRIBUTE"``
(or ``"name": "module:app"`` for a ``typer.Typer`` sub-group). Importing this package imports
nothing else: :func:`main` pauses the garbage collector (:mod:`.startup`), then loads typer and
the command tree; ``app`` and the tables are loaded on first access. Nothing here may import
the library, typer or rich at module level (``tests/unit/test_cli_imports.py`` checks).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, NoReturn

from .startup import defer_interrupt, end_start_up, exit_now, pause_gc

if TYPE_CHECKING:
    from .common import ExitCode
    from .root import COMMANDS, VM_COMMANDS, app
    from .root import STATE_DIR_HELP as STATE_DIR_HELP
    from .root import version_text as version_text
    from .root import vm_app as vm_app

__all__ = ["COMMANDS", "VM_COMMANDS", "ExitCode", "app", "main"]

#: Names served from the module that defines them, imported on first access.
_LAZY = {
    "COMMANDS": "root",
    "STATE_DIR_HELP": "root",
    "VM_COMMANDS": "root",
    "app": "root",
    "version_text": "root",
    "vm_app": "root",
    "ExitCode": "common",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule (``from ironclaw_orchestrator.cli import vm``) or a typo
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def main() -> NoReturn:
    """Console-script entry point (``ironclaw``)."""
    # The CLI uses no pydantic plugins; finding them scans every installed package's entry
    # points (~10 ms of each command). Set the variable yourself to keep plugins on.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    # No garbage collection while typer and the command's modules load (startup.py says why).
    pause_gc()
    # A Ctrl-C while the modules load is held until the command starts (startup.py says why).
    defer_interrupt()
    from .root import app

    try:
        app(prog_name="ironclaw")
    except SystemExit as exc:
        end_start_up()  # no command ran (--help, a usage error): a held Ctrl-C still counts
        exit_now(exc.code)
    end_start_up()
    exit_now(0)
