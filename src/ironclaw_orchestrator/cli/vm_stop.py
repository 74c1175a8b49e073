"""``ironclaw vm logs`` and ``ironclaw vm stop``."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Annotated, NoReturn

import typer
from rich.markup import escape

from ..errors import IronclawError
from ..registry import Registry, VmRecord, describe_process
from ..supervisor import DEFAULT_STOP_TIMEOUT_S, list_vms, stop_detached
from .common import ExitCode, exit_code_for, fail, handle_errors, stderr, stdout
from .records import get_record, open_registry
from .summaries import help_text
from .vm import _Follower

#: How often ``vm logs -f`` checks that the VM's record still exists.
RECORD_POLL_S = 0.25

LOGS_HELP = help_text(
    "vm logs",
    "-f/--follow keeps printing new output until the VM's record is gone (the VM stopped) "
    "or Ctrl-C (exit 130), or until stdout is closed (exit 141). --supervisor prints the "
    "log of a detached VM's supervisor instead, which says why it stopped.\n\n"
    "Examples:\n\n"
    "ironclaw vm logs web-1\n\n"
    "ironclaw vm logs -f web-1\n\n"
    "ironclaw vm logs --supervisor web-1",
)

STOP_HELP = help_text(
    "vm stop",
    "Asks each VM's supervisor to stop (SIGTERM) and waits up to --timeout seconds, then "
    "kills it and cleans up like `ironclaw gc`. A VM run in the foreground (`vm run` or a "
    "program using the library) is stopped by stopping that program; if that program is "
    "gone, `ironclaw gc` cleans up after it.\n\n"
    "Exit status: 0 stopped, 1 a VM could not be stopped, 2 unknown id or not a detached "
    "VM, 6 cleanup left something behind (`ironclaw gc`).\n\n"
    "Examples:\n\n"
    "ironclaw vm stop web-1\n\n"
    "ironclaw vm stop web-1 web-2 --timeout 5\n\n"
    "ironclaw vm stop --all",
)


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
    follower = _Follower(path, out, on_closed=_output_closed)
    try:
        copied = follower.drain_all()
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
                    follower.drain_all()
                    return
                next_check = now + RECORD_POLL_S
            time.sleep(0.05)
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    finally:
        follower.close()


def _output_closed() -> NoReturn:
    # `vm logs -f | head -1`: the reader is gone, so is the point of following (exit 141).
    raise typer.Exit(int(ExitCode.OUTPUT_CLOSED))


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
