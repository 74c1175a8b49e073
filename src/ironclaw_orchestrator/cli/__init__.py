"""The ``ironclaw`` command line (typer): ``doctor``, ``install``, ``vm ...`` and ``gc``.

One module per command group; :mod:`.common` holds exit codes, error output, logging and
TOML loading. This package is the only place that imports typer or rich.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..registry import STATE_DIR_ENV
from . import detached as _detached
from . import doctor as _doctor
from . import gc as _gc
from . import guest as _guest
from . import image as _image
from . import install as _install
from . import serve as _serve
from . import snapshot as _snapshot
from . import vm as _vm
from .common import ExitCode, VerboseOption, setup_logging

__all__ = ["ExitCode", "app", "main"]

app = typer.Typer(
    name="ironclaw",
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


@app.callback()
def _root(
    verbose: VerboseOption = False,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help=f"VM registry directory (sets ${STATE_DIR_ENV}; default /run/ironclaw/registry).",
            show_default=False,
        ),
    ] = None,
) -> None:
    setup_logging(verbose)
    if state_dir is not None:
        # The environment, so that everything started from here (supervisors) agrees.
        os.environ[STATE_DIR_ENV] = str(state_dir.absolute())


app.command(name="doctor", help=_doctor.HELP)(_doctor.doctor)
app.command(name="install", help=_install.HELP)(_install.install)
app.command(name="gc", help=_gc.HELP)(_gc.gc)
app.command(name="serve", help=_serve.HELP)(_serve.serve)
_detached.register(_vm.app)
_guest.register(_vm.app)
_snapshot.register(_vm.app)
app.add_typer(_vm.app, name="vm")
app.add_typer(_image.app, name="image")


def main() -> None:
    """Console-script entry point (``ironclaw``)."""
    app(prog_name="ironclaw")
