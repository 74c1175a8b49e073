"""``ironclaw vm ls`` and ``ironclaw vm stats``: what the registry and the cgroups say."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..errors import UsageError
from ..registry import VmRecord
from ..supervisor import VmStatus, list_vms
from ..vm.cgroups import CgroupStats, VmCgroups
from ..vm.consoleread import dropped_bytes
from ..vm.seccomp import SeccompStatus, read_seccomp_status
from .common import ExitCode, handle_errors, stderr, stdout
from .records import JsonOption, format_duration, get_record, open_registry, uptime_s
from .summaries import help_text

#: Shown for a counter the host cannot provide (JSON: ``null``).
MISSING = "-"

LS_HELP = help_text(
    "vm ls",
    "STATE is starting, running, stopping, exited (the VMM is gone but its owner has not "
    "cleaned up yet) or stale (the owning process is gone: `ironclaw gc` cleans it up). "
    "PID is the VMM's pid, MEMORY the guest memory and LIMIT the cgroup memory limit; "
    "SECCOMP is 'filter' when every VMM thread runs under a seccomp filter (read live).\n\n"
    "Examples:\n\n"
    "ironclaw vm ls\n\n"
    "ironclaw vm ls --json | jq '.[] | select(.status == \"stale\") | .vm_id'",
)

STATS_HELP = help_text(
    "vm stats",
    "A counter this host cannot provide shows as '-' (JSON: null). --watch refreshes "
    "every --interval seconds until Ctrl-C (exit 130) or until the VM is gone; with "
    "--json --watch it prints one JSON document per line.\n\n"
    "Examples:\n\n"
    "ironclaw vm stats web-1\n\n"
    "ironclaw vm stats web-1 --watch --interval 2\n\n"
    "ironclaw vm stats web-1 --json",
)


def _mib(value: int | None) -> str:
    return MISSING if value is None else f"{value} MiB"


def _yes_no(value: bool | None) -> str:
    return MISSING if value is None else ("yes" if value else "NO")


def _int_or_missing(value: int | None) -> str:
    return MISSING if value is None else str(value)


def status_dict(status: VmStatus, now: datetime | None = None) -> dict[str, Any]:
    """``VmStatus.to_dict()`` plus ``uptime_s`` and ``seccomp_mode`` (read live)."""
    return {
        **status.to_dict(),
        "uptime_s": round(uptime_s(status.record, now), 3),
        "seccomp_mode": seccomp_of(status).mode,
    }


def record_seccomp(record: VmRecord) -> SeccompStatus:
    """Seccomp state of a recorded VM's VMM, read live (empty when it is not running)."""
    if record.vmm_pid is None or not record.vmm_alive():
        return SeccompStatus(record.vmm_pid or 0, {})
    return read_seccomp_status(record.vmm_pid)


def seccomp_of(status: VmStatus) -> SeccompStatus:
    if not status.vmm_alive:
        return SeccompStatus(status.record.vmm_pid or 0, {})
    return record_seccomp(status.record)


def _seccomp_cell(sec: SeccompStatus) -> str:
    if sec.mode is None:
        return MISSING
    return "filter" if sec.filtered else f"[bold red]OFF[/] ({len(sec.unfiltered_threads)})"


_STATE_STYLE = {
    "running": "green",
    "starting": "cyan",
    "stopping": "yellow",
    "exited": "yellow",
    "stale": "bold red",
}


def ls(json_output: JsonOption = False) -> None:
    with handle_errors():
        registry = open_registry()
        statuses = list_vms(registry)
    now = datetime.now(UTC)
    if json_output:
        print(json.dumps([status_dict(s, now) for s in statuses], indent=2))
        return
    if not statuses:
        stderr.print(f"no VMs (registry {escape(str(registry.state_dir))})")
        return
    table = Table(box=None, pad_edge=False)
    for name, justify in (
        ("ID", "left"),
        ("STATE", "left"),
        ("UPTIME", "right"),
        ("SANDBOXED", "left"),
        ("DETACHED", "left"),
        ("PID", "right"),
        ("VCPUS", "right"),
        ("MEMORY", "right"),
        ("LIMIT", "right"),
        ("SECCOMP", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for s in statuses:
        rec = s.record
        style = _STATE_STYLE.get(s.status, "")
        table.add_row(
            escape(rec.vm_id),
            f"[{style}]{s.status}[/]" if style else s.status,
            format_duration(uptime_s(rec, now)),
            _yes_no(rec.sandboxed),
            "yes" if rec.detached else "no",
            _int_or_missing(rec.vmm_pid),
            _int_or_missing(rec.vcpus),
            _mib(rec.memory_mb),
            _mib(rec.memory_limit_mb),
            _seccomp_cell(seccomp_of(s)),
        )
    # Piped output (scripts, tests) is never truncated; a terminal gets what fits.
    wide = Console(highlight=False, soft_wrap=True, width=max(stdout.width, 200))
    (stdout if stdout.is_terminal else wide).print(table)
    stale = [s.record.vm_id for s in statuses if s.status == "stale"]
    if stale:
        stderr.print(
            f"[yellow]{len(stale)} stale VM(s)[/] (their owner is gone): run `ironclaw gc`"
        )


def read_stats(record: VmRecord) -> CgroupStats:
    """The VM's cgroup counters; ``UsageError`` if it has no cgroups."""
    if record.cgroups is None:
        why = (
            "it runs unjailed (development mode)"
            if record.sandboxed is False
            else "none are recorded yet (still starting?)"
        )
        raise UsageError(f"VM {record.vm_id} has no cgroups to read: {why}")
    return VmCgroups.from_dict(record.cgroups).stats()


def stats_dict(record: VmRecord, stats: CgroupStats) -> dict[str, Any]:
    return {
        "vm_id": record.vm_id,
        "time": datetime.now(UTC).isoformat(),
        "memory_limit_bytes": (
            None if record.memory_limit_mb is None else record.memory_limit_mb * 2**20
        ),
        **dataclasses.asdict(stats),
        "seccomp_mode": record_seccomp(record).mode,
        "console_dropped_bytes": console_dropped(record),
    }


def console_dropped(record: VmRecord) -> int | None:
    """Console bytes the VM's owner dropped to stay within its budget (from the files)."""
    return None if record.console_path is None else dropped_bytes(record.console_path)


def _seconds(ns: int | None) -> str:
    return MISSING if ns is None else f"{ns / 1e9:,.3f} s"


def _bytes(n: int | None) -> str:
    return MISSING if n is None else f"{n / 2**20:,.1f} MiB ({n:,} B)"


def _count(n: int | None) -> str:
    return MISSING if n is None else f"{n:,}"


def stats_table(record: VmRecord, stats: CgroupStats) -> Table:
    table = Table(title=f"VM {escape(record.vm_id)}", title_justify="left")
    table.add_column("counter", no_wrap=True)
    table.add_column("value", justify="right")
    limit = None if record.memory_limit_mb is None else record.memory_limit_mb * 2**20
    rows: list[tuple[str, str]] = [
        ("cpu usage", _seconds(stats.cpu_usage_ns)),
        ("cpu periods", _count(stats.nr_periods)),
        ("cpu throttled periods", _count(stats.nr_throttled)),
        ("cpu throttled time", _seconds(stats.throttled_ns)),
        ("memory current", _bytes(stats.memory_current_bytes)),
        ("memory peak", _bytes(stats.memory_peak_bytes)),
        ("memory limit", _bytes(limit)),
        ("OOM kills", _count(stats.oom_kills)),
        ("pids", _count(stats.pids_current)),
        ("seccomp", record_seccomp(record).summary()),
        ("console dropped", _bytes(console_dropped(record))),
    ]
    for name, value in rows:
        table.add_row(name, value)
    if stats.io is None:
        table.add_row("io", MISSING)
    for device, io in sorted(stats.io.items() if stats.io else []):
        table.add_row(
            f"io {device}",
            f"read {io.read_bytes:,} B / {io.read_ios:,} ops, "
            f"write {io.write_bytes:,} B / {io.write_ios:,} ops",
        )
    return table


def stats(
    vm_id: Annotated[str, typer.Argument(help="The VM's id (see `ironclaw vm ls`).")],
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C or the VM is gone.")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", "-n", help="Seconds between refreshes.", min=0.05)
    ] = 1.0,
    json_output: JsonOption = False,
) -> None:
    with handle_errors():
        registry = open_registry()
        record = get_record(registry, vm_id)
        first = read_stats(record)
    if not watch:
        if json_output:
            print(json.dumps(stats_dict(record, first), indent=2))
        else:
            stdout.print(stats_table(record, first))
        return

    def sample() -> tuple[VmRecord, CgroupStats] | None:
        current = registry.get(vm_id)
        if current is None:
            return None
        with handle_errors():
            return current, read_stats(current)

    try:
        if json_output:
            _watch_json(record, first, sample, interval)
        elif stdout.is_terminal:
            _watch_live(record, first, sample, interval)
        else:
            _watch_print(record, first, sample, interval)
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    stderr.print(f"VM {escape(vm_id)} is gone (stopped)")


Sampler = Callable[[], "tuple[VmRecord, CgroupStats] | None"]


def _watch_json(record: VmRecord, first: CgroupStats, sample: Sampler, interval: float) -> None:
    current: tuple[VmRecord, CgroupStats] | None = (record, first)
    while current is not None:
        print(json.dumps(stats_dict(*current)), flush=True)
        time.sleep(interval)
        current = sample()


def _watch_print(record: VmRecord, first: CgroupStats, sample: Sampler, interval: float) -> None:
    current: tuple[VmRecord, CgroupStats] | None = (record, first)
    while current is not None:
        stdout.print(stats_table(*current))
        sys.stdout.flush()
        time.sleep(interval)
        current = sample()


def _watch_live(record: VmRecord, first: CgroupStats, sample: Sampler, interval: float) -> None:
    with Live(stats_table(record, first), console=stdout.get(), auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            current = sample()
            if current is None:
                return
            live.update(stats_table(*current), refresh=True)
