"""``ironclaw doctor``: check that this host can run jailed microVMs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .. import doctor as lib
from ..errors import ConfigError
from ..vm.config import JailerConfig
from .common import (
    ExitCode,
    VerboseOption,
    config_problems,
    handle_errors,
    load_toml,
    setup_logging,
    stdout,
)
from .summaries import help_text

_STYLE = {lib.Status.PASS: "green", lib.Status.WARN: "yellow", lib.Status.FAIL: "bold red"}

HELP = help_text(
    "doctor",
    "Checks /dev/kvm, the firecracker and jailer binaries (found, versions match), "
    "the cgroup layout and controllers (and that VM cgroups can be created), the "
    "chroot base, the API socket path budget, network namespaces and root; then boots "
    "the built-in probe guest jailed and times it (--no-live skips that).\n\n"
    "Exit status: 0 when the host can run jailed VMs (no check failed), 3 when a "
    "check failed.\n\n"
    "Examples:\n\n"
    "ironclaw doctor\n\n"
    "ironclaw doctor --json --no-live\n\n"
    "ironclaw doctor --unjailed --config vm.toml",
)


def _jailer_config(config: Path | None) -> JailerConfig:
    if config is None:
        return JailerConfig()
    data = load_toml(config)
    table = data.get("jailer", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config file {config}: [jailer] must be a table")
    try:
        return JailerConfig(**table)
    except ConfigError as exc:
        problems = "\n".join(config_problems(exc, "jailer."))
        raise ConfigError(f"invalid config file {config}:\n{problems}") from None


def render(report: lib.DoctorReport) -> None:
    table = Table(title="ironclaw doctor", show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("found", overflow="fold")
    table.add_column("fix", overflow="fold")
    for check in report.checks:
        style = _STYLE[check.status]
        table.add_row(
            escape(check.name),
            f"[{style}]{check.status.value.upper()}[/]",
            escape(check.value),
            escape(check.fix),
        )
    stdout.print(table)
    counts = report.counts()
    summary = f"{counts['pass']} passed, {counts['warn']} warnings, {counts['fail']} failed"
    if report.ok:
        stdout.print(f"[green]ready:[/] this host can run jailed VMs ({summary})")
    else:
        stdout.print(f"[bold red]not ready:[/] {summary}")
        dev = report.get("development mode")
        if dev is not None and dev.status is lib.Status.PASS:
            stdout.print(
                "[yellow]development mode only:[/] unjailed VMs run here (not sandboxed); "
                "the 'jailed mode' row says what jailed VMs need"
            )


def doctor(
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON document with every check.")
    ] = False,
    live: Annotated[
        bool, typer.Option("--live/--no-live", help="Boot the probe guest jailed and time it.")
    ] = True,
    unjailed: Annotated[
        bool, typer.Option("--unjailed", help="Also boot the probe guest without the jailer.")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML file whose [jailer] table is checked."),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    if verbose:
        setup_logging(True)
    with handle_errors():
        jailer = _jailer_config(config)
        report = asyncio.run(lib.run_checks(jailer, live=live, live_unjailed=unjailed))
    if json_output:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    raise typer.Exit(int(ExitCode.OK if report.ok else ExitCode.HOST_NOT_READY))
