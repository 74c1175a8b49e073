"""The ``ironclaw`` command line (typer): ``doctor``, ``install`` and ``vm run``.

One module per command group; :mod:`.common` holds exit codes, error output, logging and
TOML loading. This package is the only place that imports typer or rich.
"""

from __future__ import annotations

import typer

from . import doctor as _doctor
from . import install as _install
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
        "  ironclaw vm run            # boot the built-in probe guest"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(verbose: VerboseOption = False) -> None:
    setup_logging(verbose)


app.command(name="doctor", help=_doctor.HELP)(_doctor.doctor)
app.command(name="install", help=_install.HELP)(_install.install)
app.add_typer(_vm.app, name="vm")


def main() -> None:
    """Console-script entry point (``ironclaw``)."""
    app(prog_name="ironclaw")
