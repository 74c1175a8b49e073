"""gc pass 1: records whose owner is dead. Kill their VMM, remove what the record names."""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from .. import names, procfs
from ..registry import Registry, VmRecord
from .host import GcHost
from .report import GcAction, GcReport

__all__ = ["Collector"]

_PLANNED = {"kill": "would kill", "remove": "would remove", "move aside": "would move aside"}
_DONE = {"kill": "killed", "remove": "removed", "move aside": "moved aside"}


def err_text(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


def age_s(path: Path) -> float:
    try:
        return time.time() - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class Collector:
    """One gc run: shared state, reporting, and the records pass."""

    def __init__(
        self,
        registry: Registry,
        *,
        dry_run: bool,
        chroot_bases: Sequence[Path],
        run_root: Path,
        vm_ids: Collection[str] | None,
        orphan_grace_s: float,
        kill_timeout_s: float,
        host: GcHost,
    ) -> None:
        self.registry = registry
        self.dry_run = dry_run
        self.chroot_bases = [Path(b) for b in chroot_bases]
        self.run_root = run_root
        self.vm_ids = set(vm_ids) if vm_ids is not None else None
        self.grace_s = orphan_grace_s
        self.kill_timeout_s = kill_timeout_s
        self.host = host
        self.report = GcReport(dry_run=dry_run)
        #: Ids whose record this run released (their leftovers need no grace period).
        self.released: set[str] = set()
        self.initial_records: list[VmRecord] = []

    def wanted(self, vm_id: str | None) -> bool:
        return self.vm_ids is None or vm_id in self.vm_ids

    def add(self, kind: str, name: object, vm_id: str | None, action: str, reason: str) -> GcAction:
        act = GcAction(kind, str(name), vm_id, action, reason)
        self.report.actions.append(act)
        return act

    def step(
        self,
        kind: str,
        name: object,
        vm_id: str | None,
        verb: str,
        reason: str,
        fn: Callable[[], object],
    ) -> bool:
        """Do ``fn()`` (unless dry run) and report it; False if it failed."""
        if self.dry_run:
            self.add(kind, name, vm_id, _PLANNED[verb], reason)
            return True
        act = self.add(kind, name, vm_id, _DONE[verb], reason)
        try:
            outcome = fn()
        except Exception as exc:
            act.action = "failed"
            act.error = err_text(exc)
            return False
        if outcome == "gone" or outcome == []:
            act.action = "already gone"
        return True

    # ------------------------------------------------------------------ pass 1

    def records_pass(self) -> None:
        scan = self.registry.scan()
        self.initial_records = list(scan.records)
        for problem in scan.problems:
            vm_id = problem.path.name.removesuffix(".json")
            if not self.wanted(vm_id):
                continue
            self.step(
                "record",
                problem.path,
                vm_id,
                "move aside",
                f"unreadable record ({problem.error}); its id becomes reusable",
                lambda p=problem.path: self.registry.quarantine(p),  # type: ignore[misc]
            )
        for rec in scan.records:
            if not self.wanted(rec.vm_id):
                continue
            if rec.owner_alive():
                self.report.live.append(rec.vm_id)
                continue
            self.collect_record(rec)

    def collect_record(self, rec: VmRecord) -> None:
        vm_id = rec.vm_id
        why = f"owner pid {rec.owner_pid} is gone"
        ok = self._stop_vmm(rec, why)
        if rec.cgroups is not None:
            data = rec.cgroups
            ok &= self.step(
                "cgroups", _cgroup_name(data), vm_id, "remove", why,
                lambda: self.host.remove_cgroups(data),
            )  # fmt: skip
        if rec.netns_name is not None:
            netns, tap, uplink = rec.netns_name, rec.tap, rec.uplink
            label = netns if tap is None else f"{netns} (tap {tap})"
            ok &= self.step(
                "netns", label, vm_id, "remove", why,
                lambda: self.host.remove_network(netns, vm_id, tap, uplink),
            )  # fmt: skip
        removed_dirs: list[Path] = []
        for kind, path in (("jail_dir", rec.jail_dir), ("run_dir", rec.run_dir)):
            if path is None:
                continue
            problem = _unsafe_dir(kind, path, vm_id)
            if problem:
                act = self.add(kind, path, vm_id, "skipped", why)
                act.error = problem
                ok = False
                continue
            removed_dirs.append(path)
            if os.path.lexists(path):
                ok &= self.step(kind, path, vm_id, "remove", why, self._remover(kind, path))
        sock = rec.api_socket
        if (
            sock is not None
            and not any(d == sock or d in sock.parents for d in removed_dirs)
            and is_socket(sock)
            and not socket_answers(sock)
        ):
            ok &= self.step("socket", sock, vm_id, "remove", "stale API socket", sock.unlink)
        record = self.registry.record_path(vm_id)
        if ok:
            self.step("record", record, vm_id, "remove", why, lambda: self.registry.release(vm_id))
            self.released.add(vm_id)
        else:
            self.add(
                "record", record, vm_id, "skipped",
                "kept because some cleanup failed; run `ironclaw gc` again",
            )  # fmt: skip

    def _remover(self, kind: str, path: Path) -> Callable[[], None]:
        remove = self.host.remove_jail_dir if kind == "jail_dir" else self.host.remove_run_dir
        return lambda: remove(path)

    def _stop_vmm(self, rec: VmRecord, why: str) -> bool:
        """Kill the record's VMM (by pid + start time, or in its recorded jail); reap zombies.

        Only the *recorded* jail is searched: a jail of the same id elsewhere may belong to
        a VM another orchestrator started after this one died.
        """
        vm_id = rec.vm_id
        ok = True
        if not self.dry_run and self.host.reap_zombie(rec.owner_pid, rec.owner_start_time):
            self.add("owner", rec.owner_pid, vm_id, "reaped", "exited child of ours")
        pid, start = rec.vmm_pid, rec.vmm_start_time
        if pid is not None and start is not None:
            if procfs.is_alive(pid, start, self.host.proc):
                ok &= self.step(
                    "vmm", pid, vm_id, "kill", why,
                    lambda: self.host.kill(pid, start, self.kill_timeout_s),
                )  # fmt: skip
            elif not self.dry_run and self.host.reap_zombie(pid, start):
                self.add("vmm", pid, vm_id, "reaped", "exited child of ours")
        jail = rec.jail_dir
        if jail is not None and _unsafe_dir("jail_dir", jail, vm_id) is None:
            users = self.host.jail_processes(jail)
            if users:
                ok &= self.step(
                    "vmm", ", ".join(map(str, users)), vm_id, "kill",
                    f"{why}; running in its jail {jail}",
                    lambda: self.host.kill_jail_processes(jail, self.kill_timeout_s),
                )  # fmt: skip
        return ok


def _cgroup_name(data: dict[str, object]) -> str:
    parent = str(data.get("parent", "")).strip("/")
    return f"{parent}/{data.get('vm_id', '?')}"


def _unsafe_dir(kind: str, path: Path, vm_id: str) -> str | None:
    """Why a recorded directory must not be deleted (a corrupt record must not hurt)."""
    if not path.is_absolute() or path.name != vm_id or ".." in path.parts:
        return f"recorded {kind} {path} is not a directory named after VM {vm_id}; not removed"
    if kind == "run_dir" and path.parent.name != names.VMS_DIR:
        return f"recorded run_dir {path} is not <run root>/vms/{vm_id}; not removed"
    if kind == "jail_dir" and len(path.parts) < 4:
        return f"recorded jail_dir {path} is not <chroot base>/<exec>/{vm_id}; not removed"
    if os.path.islink(path):
        return f"recorded {kind} {path} is a symlink; not removed"
    return None
