"""Detached VMs: ``ironclaw vm start|ls|stats|logs|stop``.

``vm start`` hands the VM to a supervisor process of its own (:func:`spawn_supervisor`) and
returns once it runs; the other commands find VMs through the registry (``--state-dir`` /
``$IRONCLAW_STATE_DIR``). ``vm ls`` lists every registered VM, detached or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from ..errors import IronclawError, UsageError
from ..registry import Registry, VmRecord, describe_process
from ..supervisor import (
    DEFAULT_SPAWN_TIMEOUT_S,
    DEFAULT_STOP_TIMEOUT_S,
    VmStatus,
    list_vms,
    spawn_supervisor,
    stop_detached,
)
from ..vm.cgroups import CgroupStats, VmCgroups
from .common import (
    BootArgsOption,
    ConfigFileOption,
    ExitCode,
    IdOption,
    KernelOption,
    MemoryOption,
    RequireSandboxOption,
    RootfsOption,
    VcpusOption,
    VerboseOption,
    exit_code_for,
    fail,
    handle_errors,
    setup_logging,
    stderr,
    stdout,
)
from .vm import Probe, _Follower, build_config

#: How often ``vm logs -f`` checks that the VM's record still exists.
RECORD_POLL_S = 0.25
#: Shown for a counter the host cannot provide (JSON: ``null``).
MISSING = "-"

START_HELP = (
    "Start a microVM detached: a supervisor process of its own boots it and keeps it "
    "running after this command returns.\n\n"
    "vm start always detaches (-d/--detach is implied and accepted, as in `docker run "
    "-d`); use `ironclaw vm run` to run a VM in the foreground. Takes the flags and the "
    "TOML file of `vm run`. Without --kernel it boots the built-in probe guest with "
    "--probe halt, so the VM stays up until `ironclaw vm stop`.\n\n"
    "Prints the VM id on stdout (--json: its registry record) once the VM runs. If the "
    "VM cannot start, nothing is left behind and the error says why.\n\n"
    "Exit status: 0 running, 1 VM error (or the id is in use), 2 usage or configuration "
    "error, 3 host not ready.\n\n"
    "Examples:\n\n"
    "sudo ironclaw vm start -d --id web-1\n\n"
    "sudo ironclaw vm start --kernel vmlinux --rootfs rootfs.ext4 --memory 512 --id web-2\n\n"
    "sudo ironclaw --state-dir /tmp/ic vm start -d --json"
)

LS_HELP = (
    "List the VMs in the registry, detached or not.\n\n"
    "STATE is starting, running, stopping, exited (the VMM is gone but its owner has not "
    "cleaned up yet) or stale (the owning process is gone: `ironclaw gc` cleans it up). "
    "PID is the VMM's pid, MEMORY the guest memory and LIMIT the cgroup memory limit.\n\n"
    "Examples:\n\n"
    "ironclaw vm ls\n\n"
    "ironclaw vm ls --json | jq '.[] | select(.status == \"stale\") | .vm_id'"
)

STATS_HELP = (
    "Show a VM's resource usage, read from its cgroups (jailed VMs only).\n\n"
    "A counter this host cannot provide shows as '-' (JSON: null). --watch refreshes "
    "every --interval seconds until Ctrl-C (exit 130) or until the VM is gone; with "
    "--json --watch it prints one JSON document per line.\n\n"
    "Examples:\n\n"
    "ironclaw vm stats web-1\n\n"
    "ironclaw vm stats web-1 --watch --interval 2\n\n"
    "ironclaw vm stats web-1 --json"
)

LOGS_HELP = (
    "Print a VM's serial console (and firecracker's own log lines).\n\n"
    "-f/--follow keeps printing new output until the VM's record is gone (the VM stopped) "
    "or Ctrl-C (exit 130). --supervisor prints the log of a detached VM's supervisor "
    "instead, which says why it stopped.\n\n"
    "Examples:\n\n"
    "ironclaw vm logs web-1\n\n"
    "ironclaw vm logs -f web-1\n\n"
    "ironclaw vm logs --supervisor web-1"
)

STOP_HELP = (
    "Stop detached VMs and remove everything made for them.\n\n"
    "Asks each VM's supervisor to stop (SIGTERM) and waits up to --timeout seconds, then "
    "kills it and cleans up like `ironclaw gc`. A VM run in the foreground (`vm run` or a "
    "program using the library) is stopped by stopping that program; if that program is "
    "gone, `ironclaw gc` cleans up after it.\n\n"
    "Exit status: 0 stopped, 1 a VM could not be stopped, 2 unknown id or not a detached "
    "VM, 6 cleanup left something behind (`ironclaw gc`).\n\n"
    "Examples:\n\n"
    "ironclaw vm stop web-1\n\n"
    "ironclaw vm stop web-1 web-2 --timeout 5\n\n"
    "ironclaw vm stop --all"
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


# --------------------------------------------------------------------------- helpers


def open_registry() -> Registry:
    """The registry of ``--state-dir`` / ``$IRONCLAW_STATE_DIR`` (``RegistryError`` if unsafe)."""
    return Registry()


def get_record(registry: Registry, vm_id: str) -> VmRecord:
    """The record of ``vm_id``; exits 2 with a clear message if there is none."""
    record = registry.get(vm_id)
    if record is None:
        fail(
            f"no VM {vm_id!r} in the registry {registry.state_dir}: see `ironclaw vm ls` "
            "(or pass the --state-dir it was started with)"
        )
    return record


def format_duration(seconds: float) -> str:
    """``42s``, ``5m07s``, ``3h02m``, ``2d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def uptime_s(record: VmRecord, now: datetime | None = None) -> float:
    """Seconds since the VM's id was claimed."""
    return ((now or datetime.now(UTC)) - record.created_at).total_seconds()


def _mib(value: int | None) -> str:
    return MISSING if value is None else f"{value} MiB"


def _yes_no(value: bool | None) -> str:
    return MISSING if value is None else ("yes" if value else "NO")


def _int_or_missing(value: int | None) -> str:
    return MISSING if value is None else str(value)


# --------------------------------------------------------------------------- vm start


def start(
    vm_id: IdOption = None,
    vcpus: VcpusOption = None,
    memory: MemoryOption = None,
    kernel: KernelOption = None,
    rootfs: RootfsOption = None,
    boot_args: BootArgsOption = None,
    require_sandbox: RequireSandboxOption = False,
    config_file: ConfigFileOption = None,
    probe: Annotated[
        Probe | None,
        typer.Option(
            "--probe",
            help="Probe guest behaviour (without --kernel): reset|halt|spin. Default: halt.",
        ),
    ] = None,
    detach: Annotated[
        bool,
        typer.Option("--detach", "-d", help="Run detached (implied: vm start always detaches)."),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Seconds to wait for the VM to run.", min=0.1),
    ] = DEFAULT_SPAWN_TIMEOUT_S,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    if verbose:
        setup_logging(True)
    del detach  # always detached; the flag exists for `docker run -d` habits
    overrides: dict[str, Any] = {
        "vm_id": vm_id,
        "vcpu_count": vcpus,
        "memory_mb": memory,
        "kernel_path": None if kernel is None else str(kernel),
        "rootfs_path": None if rootfs is None else str(rootfs),
        "boot_args": boot_args,
        "require_sandbox": True if require_sandbox else None,
    }
    with handle_errors():
        config, behaviour = build_config(config_file=config_file, overrides=overrides, probe=probe)
        if behaviour is not None and probe is None:
            # The probe guest by default, but one that stays up (reset would end at once).
            config, behaviour = build_config(
                config_file=config_file,
                overrides={**overrides, "vm_id": config.vm_id},
                probe=Probe.halt,
            )
        registry = open_registry()
        try:
            record = asyncio.run(spawn_supervisor(config, registry, timeout_s=timeout))
        except KeyboardInterrupt:
            _interrupted_start(registry, config.vm_id)
    if json_output:
        print(json.dumps(record.model_dump(mode="json"), indent=2))
    else:
        print(record.vm_id, flush=True)
    if record.sandboxed is False:
        stderr.print(
            f"[yellow]warning:[/] VM {escape(record.vm_id)} is NOT sandboxed (no jailer): "
            "do not run untrusted code in it"
        )
    stderr.print(
        f"VM {escape(record.vm_id)} running (supervisor pid {record.owner_pid}, VMM pid "
        f"{record.vmm_pid}); `ironclaw vm logs {escape(record.vm_id)}`, "
        f"`ironclaw vm stop {escape(record.vm_id)}`"
    )


def _interrupted_start(registry: Registry, vm_id: str) -> None:
    """Ctrl-C while the supervisor was starting the VM: stop it again, if it got that far."""
    stderr.print(f"[yellow]interrupted:[/] stopping VM {escape(vm_id)}")
    record = registry.get(vm_id)
    if record is not None and record.detached:
        with contextlib.suppress(IronclawError):
            asyncio.run(stop_detached(registry, vm_id))
    if registry.get(vm_id) is not None:
        stderr.print(
            f"[yellow]warning:[/] VM {escape(vm_id)} may still exist: check `ironclaw vm ls`, "
            f"then `ironclaw vm stop {escape(vm_id)}` or `ironclaw gc`"
        )
    raise typer.Exit(int(ExitCode.INTERRUPTED))


# --------------------------------------------------------------------------- vm ls


def status_dict(status: VmStatus, now: datetime | None = None) -> dict[str, Any]:
    """``VmStatus.to_dict()`` plus ``uptime_s``."""
    return {**status.to_dict(), "uptime_s": round(uptime_s(status.record, now), 3)}


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
        )
    stdout.print(table)
    stale = [s.record.vm_id for s in statuses if s.status == "stale"]
    if stale:
        stderr.print(
            f"[yellow]{len(stale)} stale VM(s)[/] (their owner is gone): run `ironclaw gc`"
        )


# --------------------------------------------------------------------------- vm stats


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
    }


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
    with Live(stats_table(record, first), console=stdout, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            current = sample()
            if current is None:
                return
            live.update(stats_table(*current), refresh=True)


# --------------------------------------------------------------------------- vm logs


def logs(
    vm_id: Annotated[str, typer.Argument(help="The VM's id (see `ironclaw vm ls`).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the VM is gone.")
    ] = False,
    supervisor: Annotated[
        bool,
        typer.Option("--supervisor", help="Print the supervisor's log instead of the console."),
    ] = False,
) -> None:
    with handle_errors():
        registry = open_registry()
        record = get_record(registry, vm_id)
    path = record.log_path if supervisor else record.console_path
    if path is None:
        what = "supervisor log (it is not detached)" if supervisor else "console log yet"
        fail(f"VM {vm_id} has no {what}", ExitCode.VM_ERROR)
    out = sys.stdout.buffer
    follower = _Follower(path, out)
    try:
        copied = follower.drain()
        if not follow:
            if not copied and not path.exists():
                fail(f"VM {vm_id}: its log {path} does not exist (yet)", ExitCode.VM_ERROR)
            return
        next_check = 0.0
        while True:
            if follower.drain():
                continue
            now = time.monotonic()
            if now >= next_check:
                if registry.get(vm_id) is None:
                    follower.drain()
                    return
                next_check = now + RECORD_POLL_S
            time.sleep(0.05)
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    finally:
        follower.close()


# --------------------------------------------------------------------------- vm stop


async def _stop_one(registry: Registry, vm_id: str, timeout: float) -> str:
    report = await stop_detached(registry, vm_id, timeout)
    if report is None:
        return f"stopped VM {vm_id}"
    done = sum(1 for a in report.actions if a.vm_id == vm_id and a.error is None)
    return (
        f"stopped VM {vm_id} (its supervisor was gone or did not stop in time; cleaned up "
        f"like `ironclaw gc`: {done} action(s))"
    )


def _not_detached_message(record: VmRecord) -> str:
    owner = describe_process(record.owner_pid, record.owner_start_time)
    if record.owner_alive():
        return (
            f"VM {record.vm_id} is not detached: it belongs to {owner}, a program of its own; "
            "stop that program (e.g. Ctrl-C in its terminal) to stop the VM"
        )
    return (
        f"VM {record.vm_id} is not detached and its owner ({owner}) is gone: run "
        f"`ironclaw gc` to clean it up"
    )


def stop(
    vm_ids: Annotated[
        list[str] | None, typer.Argument(help="Ids of the VMs to stop.", show_default=False)
    ] = None,
    all_vms: Annotated[bool, typer.Option("--all", help="Stop every detached VM.")] = False,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Seconds to wait for each supervisor to stop.", min=0.0),
    ] = DEFAULT_STOP_TIMEOUT_S,
) -> None:
    ids = list(vm_ids or [])
    if all_vms and ids:
        fail("give VM ids or --all, not both")
    if not all_vms and not ids:
        fail("which VM? give its id (see `ironclaw vm ls`) or --all")
    with handle_errors():
        registry = open_registry()
        if all_vms:
            records = [s.record for s in list_vms(registry)]
            for rec in records:
                if not rec.detached:
                    stderr.print(f"[yellow]skipped:[/] {escape(_not_detached_message(rec))}")
            ids = [r.vm_id for r in records if r.detached]
            if not ids:
                stderr.print("no detached VMs to stop")
                return
        else:
            for vm_id in ids:
                rec = get_record(registry, vm_id)
                if not rec.detached:
                    fail(_not_detached_message(rec))
    results = asyncio.run(_stop_all(registry, ids, timeout))
    worst = ExitCode.OK
    for result in results:
        if isinstance(result, BaseException):
            stderr.print(f"[bold red]error:[/] [red]{escape(str(result))}[/]")
            worst = max(worst, exit_code_for(result))
        else:
            stdout.print(escape(result))
    raise typer.Exit(int(worst))


async def _stop_all(
    registry: Registry, ids: list[str], timeout: float
) -> list[str | BaseException]:
    results = await asyncio.gather(
        *(_stop_one(registry, vm_id, timeout) for vm_id in ids), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # KeyboardInterrupt, CancelledError, SystemExit
        if isinstance(result, Exception) and not isinstance(result, IronclawError):
            raise result
    return list(results)


# --------------------------------------------------------------------------- registration


def register(app: typer.Typer) -> None:
    """Add ``start``, ``ls``, ``stats``, ``logs`` and ``stop`` to the ``vm`` group."""
    app.command(name="start", help=START_HELP)(start)
    app.command(name="ls", help=LS_HELP)(ls)
    app.command(name="stats", help=STATS_HELP)(stats)
    app.command(name="logs", help=LOGS_HELP)(logs)
    app.command(name="stop", help=STOP_HELP)(stop)


__all__ = ["logs", "ls", "register", "start", "stats", "stop"]
