"""``ironclaw gc``: remove what crashed or killed orchestrators left behind."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ..gc import DEFAULT_ORPHAN_GRACE_S, GcReport, collect_garbage
from ..gc.user import gc_host_for_user
from ..registry import Registry, check_vm_id
from ..vm.config import JailerConfig
from .common import ExitCode, VerboseOption, handle_errors, setup_logging, stderr, stdout
from .summaries import help_text

HELP = help_text(
    "gc",
    "For each registry record whose owning process is gone: kills its VMM (if it is still "
    "the same process) and removes exactly what the record names (cgroups, tap, network "
    "namespace, jail and run directories, socket), then the record. Then removes orphans "
    "that are unmistakably ours (ironclaw-<id> namespaces, marked jail directories, run "
    "directories, cgroups under our parent) unless something still uses them or they are "
    "younger than --grace seconds. VMs with a live owner are never touched.\n\n"
    "Exit status: 0 everything was cleaned up, 1 some step failed (the table and --json "
    "say which; the record is kept so a later gc retries), 2 usage error.\n\n"
    "Examples:\n\n"
    "sudo ironclaw gc --dry-run\n\n"
    "sudo ironclaw gc\n\n"
    "sudo ironclaw gc --id web-1 --json",
)

_STYLE = {"failed": "bold red", "skipped": "yellow"}


def render(report: GcReport) -> None:
    if not report.actions:
        stdout.print("nothing to clean up")
    else:
        table = Table(title="ironclaw gc (dry run)" if report.dry_run else "ironclaw gc")
        table.add_column("VM", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("what", overflow="fold")
        table.add_column("action", no_wrap=True)
        table.add_column("why", overflow="fold")
        for a in report.actions:
            style = "bold red" if a.error else _STYLE.get(a.action, "")
            action = f"[{style}]{escape(a.action)}[/]" if style else escape(a.action)
            why = a.reason if a.error is None else f"{a.error} ({a.reason})"
            table.add_row(escape(a.vm_id or "-"), a.kind, escape(a.name), action, escape(why))
        stdout.print(table)
    if report.live:
        stdout.print(f"left alone (owner alive): {escape(', '.join(report.live))}")
    if report.dry_run:
        stdout.print("[cyan]dry run:[/] nothing was changed")
    if not report.ok:
        stderr.print(
            f"[bold red]error:[/] [red]{len(report.errors)} cleanup step(s) failed; the records "
            "involved are kept: fix the cause and run `ironclaw gc` again[/]"
        )


def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Only report what would be done.")
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the report as one JSON document.")
    ] = False,
    vm_ids: Annotated[
        list[str] | None,
        typer.Option("--id", help="Only this VM id (repeatable).", show_default=False),
    ] = None,
    chroot_bases: Annotated[
        list[Path] | None,
        typer.Option(
            "--chroot-base",
            help="Jailer chroot base to scan (repeatable; default: the JailerConfig default).",
            show_default=False,
        ),
    ] = None,
    grace: Annotated[
        float,
        typer.Option("--grace", help="Leave unrecorded resources younger than this (s).", min=0),
    ] = DEFAULT_ORPHAN_GRACE_S,
    verbose: VerboseOption = False,
) -> None:
    if verbose:
        setup_logging(True)
    bases = tuple(chroot_bases) if chroot_bases else (JailerConfig().chroot_base_dir,)
    with handle_errors():
        for vm_id in vm_ids or []:
            check_vm_id(vm_id)
        # Not root: only our own registry, run dir and VMMs (see gc.user).
        host, scan_jails = gc_host_for_user()
        collect = collect_garbage if host is None else functools.partial(collect_garbage, host=host)
        report = collect(
            Registry(),
            dry_run=dry_run,
            chroot_bases=bases if scan_jails or chroot_bases else (),
            vm_ids=vm_ids or None,
            orphan_grace_s=grace,
        )
    if json_output:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        render(report)
    raise typer.Exit(int(ExitCode.OK if report.ok else ExitCode.VM_ERROR))
