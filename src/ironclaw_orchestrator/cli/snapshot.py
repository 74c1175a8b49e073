"""``ironclaw vm pause / resume / snapshot / restore``: thin layers over the library.

pause, resume and snapshot act on any running jailed VM in the registry (detached or owned
by another program) through its API socket; restore starts a new VM from a snapshot in a
fresh jail and runs it in the foreground (Ctrl-C stops it and removes everything), or with
``-d`` hands it to a supervisor process of its own, like ``vm start``.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from ..detach import DEFAULT_SPAWN_TIMEOUT_S, spawn_restore_supervisor
from ..errors import UsageError
from ..registry import VmRecord
from ..vm import restore_snapshot
from ..vm.api import FirecrackerApi
from ..vm.binaries import Version
from ..vm.config import JailerConfig, VmConfig
from ..vm.snapshot import Snapshot, SnapshotSource, snapshot_vm
from ..vm.snapshot_api import diff_needs_tracking
from ..vm.snapshot_base import diff_base
from .common import ExitCode, IdOption, VerboseOption, handle_errors, setup_logging, stderr
from .records import JsonOption, get_record, open_registry
from .summaries import help_text

__all__ = ["pause", "restore", "resume", "snapshot"]

PAUSE_HELP = help_text("vm pause", "Example:\n\nironclaw vm pause web-1")
RESUME_HELP = help_text("vm resume", "Example:\n\nironclaw vm resume web-1")
SNAPSHOT_HELP = help_text(
    "vm snapshot",
    "The VM is paused while its memory, state and root drive are written, then resumed "
    "(--no-resume leaves it paused). DIR gets the files and a manifest (config, firecracker "
    "version, sizes, SHA-256 of each file); it appears only once complete.\n\n"
    "With --diff, a Diff snapshot: Firecracker writes only the pages dirtied since the VM's "
    "latest snapshot, which are merged onto a copy of that snapshot's memory, so DIR is "
    "complete on its own. The VM must track dirty pages (track_dirty_pages = true) and have "
    "a base: its latest snapshot, found by itself, or for a VM restored from a snapshot that "
    "took none since, that snapshot given with --base.\n\n"
    "Examples:\n\n"
    "ironclaw vm snapshot web-1 /var/lib/ironclaw/snaps/web-1\n\n"
    "ironclaw vm snapshot web-1 ./snap --json\n\n"
    "ironclaw vm snapshot web-1 ./snap-2 --diff\n\n"
    "ironclaw vm snapshot fork-1 ./fork-snap --diff --base ./snap",
)
RESTORE_HELP = help_text(
    "vm restore",
    "The snapshot is verified first (sizes, SHA-256, firecracker version); nothing starts if "
    "it is incomplete, altered or from another release. The new VM has its own uid/gid, "
    "cgroups, network namespace and copy of the root drive. In the foreground Ctrl-C stops "
    "it and removes everything. With -d/--detach a supervisor process of its own keeps it "
    "running after this command returns, as for `vm start`: it is listed by `vm ls` and "
    "stopped by `vm stop`; the VM id is printed (--json: its registry record).\n\n"
    "Examples:\n\n"
    "ironclaw vm restore ./snap --id web-1-fork\n\n"
    "ironclaw vm restore ./snap --id web-1-fork -d\n\n"
    "ironclaw vm restore ./snap --id paused-1 --paused",
)


def _running_record(vm_id: str) -> VmRecord:
    record = get_record(open_registry(), vm_id)
    if record.api_socket is None or not record.vmm_alive():
        raise UsageError(
            f"VM {vm_id} is not running (no live VMM in its record): see `ironclaw vm ls`"
        )
    return record


def _print(data: dict[str, Any], json_output: bool, text: str) -> None:
    if json_output:
        print(json.dumps(data, indent=2))
    else:
        print(text, flush=True)


async def _patch_state(record: VmRecord, state: str) -> None:
    assert record.api_socket is not None
    async with FirecrackerApi(record.api_socket, vm_id=record.vm_id) as api:
        await (api.pause() if state == "Paused" else api.resume())


def pause(
    vm_id: Annotated[str, typer.Argument(help="VM id.")], json_output: JsonOption = False
) -> None:
    with handle_errors():
        asyncio.run(_patch_state(_running_record(vm_id), "Paused"))
    _print({"vm_id": vm_id, "state": "Paused"}, json_output, f"{vm_id} paused")


def resume(
    vm_id: Annotated[str, typer.Argument(help="VM id.")], json_output: JsonOption = False
) -> None:
    with handle_errors():
        asyncio.run(_patch_state(_running_record(vm_id), "Resumed"))
    _print({"vm_id": vm_id, "state": "Running"}, json_output, f"{vm_id} resumed")


def record_config(record: VmRecord) -> VmConfig:
    """The VM's config from its record, jail settings reduced to those that differ from the
    defaults and are not host-specific (ids, binaries), so a restore elsewhere works."""
    data = dict(record.config or {})
    jailer = data.pop("jailer", None) or {}
    defaults = JailerConfig().model_dump(mode="json")
    host_specific = {"jailer_id", "uid", "gid", "exec_file", "jailer_binary", "memory_limit_mb",
                     "cpu_count"}  # fmt: skip
    kept = {k: v for k, v in jailer.items() if k not in host_specific and defaults.get(k) != v}
    return VmConfig(**data, jailer=JailerConfig(**kept) if kept else None)


async def _snapshot(
    record: VmRecord,
    dest: Path,
    resume_after: bool,
    progress: Progress,
    diff: bool = False,
    base_dir: Path | None = None,
) -> Snapshot:
    assert record.api_socket is not None and record.jail_dir is not None
    if record.uid is None or record.gid is None:
        raise UsageError(f"VM {record.vm_id} is not jailed: snapshots need a jailed VM")
    tasks: dict[str, Any] = {}

    def report(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(
                "copying root drive" if phase == "copy" else "hashing", total=total
            )
        progress.update(tasks[phase], completed=done, total=total)

    async with FirecrackerApi(record.api_socket, vm_id=record.vm_id) as api:
        info = await api.describe()
    version = Version.parse("v" + str(info.get("vmm_version", "")).lstrip("v"))
    paused = info.get("state") == "Paused"
    chroot = Path(record.jail_dir) / "root"
    config = record_config(record)
    base = None
    if diff:
        if not config.track_dirty_pages and diff_needs_tracking(version):
            raise UsageError(
                f"VM {record.vm_id}: Firecracker {version} writes Diff snapshots only of VMs "
                "that track dirty pages: start (or restore) it with track_dirty_pages = true, "
                "or take a Full snapshot"
            )
        base = await asyncio.to_thread(diff_base, record.vm_id, Path(record.jail_dir), base_dir)
    # A fresh connection for the pause (see snapshot_vm on GET / right before PATCH /vm).
    async with FirecrackerApi(record.api_socket, vm_id=record.vm_id) as api:
        source = SnapshotSource(api, chroot, record.uid, record.gid, version, config)
        return await snapshot_vm(
            source, dest, diff=diff, base=base, resume=resume_after, was_paused=paused,
            progress=report,
        )  # fmt: skip


def snapshot(
    vm_id: Annotated[str, typer.Argument(help="VM id.")],
    dest: Annotated[Path, typer.Argument(help="New directory for the snapshot.")],
    no_resume: Annotated[bool, typer.Option("--no-resume", help="Leave the VM paused.")] = False,
    diff: Annotated[
        bool, typer.Option("--diff", help="Only the pages dirtied since its latest snapshot.")
    ] = False,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            help="With --diff, for a restored VM: the snapshot it was restored from.",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    with handle_errors():
        if base is not None and not diff:
            raise UsageError("--base names the base of a Diff snapshot: add --diff")
        record = _running_record(vm_id)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
        )
        console = stderr.get()
        with Progress(*columns, console=console, transient=True, disable=json_output) as progress:
            snap = asyncio.run(
                _snapshot(record, dest.absolute(), not no_resume, progress, diff, base)
            )
    data = snap.manifest.model_dump(mode="json", exclude={"config"})
    _print({"path": str(snap.path), **data}, json_output, str(snap.path))


async def _restore_and_wait(snap_dir: Path, vm_id: str, resume_vm: bool, json_output: bool) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    snap = await asyncio.to_thread(Snapshot.load, snap_dir)
    vm = await restore_snapshot(snap, vm_id, resume=resume_vm)
    try:
        _print(
            {"vm_id": vm.vm_id, "vmm_pid": vm.pid, "console": str(vm.console_path)},
            json_output,
            vm.vm_id,
        )
        stderr.print(
            f"VM {escape(vm.vm_id)} restored from {escape(str(snap.path))} (VMM pid {vm.pid}, "
            f"console {escape(str(vm.console_path))}); Ctrl-C stops it"
        )
        waiting = asyncio.ensure_future(vm.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if waiting.done():
            return int(ExitCode.OK if waiting.result() == 0 else ExitCode.VM_ERROR)
        waiting.cancel()
        return int(ExitCode.INTERRUPTED)
    finally:
        await vm.stop()


def restore(
    snap_dir: Annotated[Path, typer.Argument(help="Snapshot directory.")],
    vm_id: IdOption = None,
    paused: Annotated[bool, typer.Option("--paused", help="Load it without resuming.")] = False,
    detach: Annotated[
        bool,
        typer.Option("--detach", "-d", help="Keep it running after this command returns."),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="With -d: seconds to wait for the VM to run.", min=0.1),
    ] = DEFAULT_SPAWN_TIMEOUT_S,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    if verbose:
        setup_logging(True)
    with handle_errors():
        new_id = vm_id or f"{snap_dir.name[:40]}-restored"
        if detach:
            _restore_detached(snap_dir, new_id, not paused, timeout, json_output)
            return
        code = asyncio.run(_restore_and_wait(snap_dir, new_id, not paused, json_output))
    raise typer.Exit(code)


def _restore_detached(
    snap_dir: Path, vm_id: str, resume_vm: bool, timeout: float, json_output: bool
) -> None:
    from .detached import _interrupted_start

    registry = open_registry()
    try:
        record = asyncio.run(
            spawn_restore_supervisor(snap_dir, vm_id, registry, resume=resume_vm, timeout_s=timeout)
        )
    except KeyboardInterrupt:
        _interrupted_start(registry, vm_id)
    if json_output:
        print(json.dumps(record.model_dump(mode="json"), indent=2))
    else:
        print(record.vm_id, flush=True)
    stderr.print(
        f"VM {escape(record.vm_id)} restored from {escape(str(snap_dir))} "
        f"({'paused' if not resume_vm else 'running'}; supervisor pid {record.owner_pid}, "
        f"VMM pid {record.vmm_pid}); `ironclaw vm logs {escape(record.vm_id)}`, "
        f"`ironclaw vm stop {escape(record.vm_id)}`"
    )
