"""gc pass 2: resources with no record that are unmistakably ours, and used by no process.

An id counts as *in use* (and none of its resources is touched) while any process on the
host is inside its network namespace, has its root or cwd (or an open file) in one of its
jail directories under any chroot base, holds a file in its run directory, or sits in a
cgroup named after it. All of ``/proc`` is checked, not just recorded pids: a VM started
without a PID namespace, without a pid file, under another state directory or with no
registry at all is found the same way.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from .. import names
from ..registry import VmRecord
from ..vm.cleanup import claim_id_of
from .records import Collector, age_s, is_socket, socket_answers

__all__ = ["orphans_pass"]

WHY = "no record (left behind by a crash)"


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if _is_real_dir(p))
    except OSError:
        return []


def _sockets_in(path: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(path):
        out += [Path(dirpath, f) for f in files if is_socket(Path(dirpath, f))]
    return out


class _Orphans:
    def __init__(self, c: Collector) -> None:
        self.c = c
        self.known = {r.vm_id for r in c.registry.scan().records}
        self._busy: dict[str, list[int]] = {}

    def candidate(self, vm_id: str | None) -> bool:
        return vm_id is not None and vm_id not in self.known and self.c.wanted(vm_id)

    def id_dirs(self, vm_id: str) -> list[Path]:
        """The id's jail directories (any base, any exec name) and run directory."""
        found = [
            exec_dir / vm_id
            for base in self.c.chroot_bases
            for exec_dir in _subdirs(base)
            if _is_real_dir(exec_dir / vm_id)
        ]
        run_dir = names.vm_run_dir(self.c.run_root, vm_id)
        return [*found, run_dir] if _is_real_dir(run_dir) else found

    def users(self, vm_id: str) -> list[int]:
        """Every process using any resource named after ``vm_id`` (cached per run)."""
        if vm_id not in self._busy:
            host = self.c.host
            pids = set(host.netns_users(names.netns_name(vm_id)))
            for path in self.id_dirs(vm_id):
                pids.update(host.dir_users(path))
            pids.update(host.cgroup_users(vm_id))
            self._busy[vm_id] = sorted(pids)
        return self._busy[vm_id]

    def ok(self, kind: str, name: object, vm_id: str, age_of: Path | None) -> bool:
        """Report and return False if the resource is in use or too young to be a leftover."""
        users = self.users(vm_id)
        if users:
            pids = ", ".join(map(str, users[:10]))
            self.c.add(
                kind, name, vm_id, "skipped",
                f"no record, but in use by pid {pids} (a VM started without this registry?);"
                " stop it first",
            )  # fmt: skip
            return False
        # A namespace has no age of its own: it is as young as the id's directories (a VM
        # being started without a registry has made its jail and run dir just before).
        ages = [age_of] if age_of is not None else self.id_dirs(vm_id)
        young = any(age_s(p) < self.c.grace_s for p in ages)
        if young and vm_id not in self.c.released:
            self.c.add(
                kind, name, vm_id, "skipped",
                f"no record, but younger than {self.c.grace_s:g}s (may be starting)",
            )  # fmt: skip
            return False
        return True

    # ------------------------------------------------------------------ resources

    def netns(self) -> None:
        for name in self.c.host.list_netns():
            vm_id = names.id_from_netns(name)
            if not self.candidate(vm_id) or vm_id is None:
                continue
            if self.ok("netns", name, vm_id, None):
                self.c.step(
                    "netns", name, vm_id, "remove", WHY,
                    lambda n=name, v=vm_id: self.c.host.remove_network(n, v, None, False),  # type: ignore[misc]
                )  # fmt: skip

    def jails(self) -> None:
        for base in self.c.chroot_bases:
            for exec_dir in _subdirs(base):
                for jail in _subdirs(exec_dir):
                    self._jail(jail)

    def _jail(self, jail: Path) -> None:
        claim_of = claim_id_of(jail.name)
        if claim_of is not None:
            # A jail being made (or abandoned mid-claim): ours by its name.
            if self.candidate(claim_of) and self.ok("jail_dir", jail, claim_of, jail):
                self.c.step(
                    "jail_dir", jail, claim_of, "remove", "unfinished jail claim",
                    lambda: self.c.host.remove_jail_dir(jail),
                )  # fmt: skip
            return
        vm_id = jail.name
        marker = jail / names.JAIL_MARKER
        if not names.is_valid_id(vm_id) or not self.candidate(vm_id):
            return
        if not marker.is_file() or marker.is_symlink():
            return  # not made by us: never touched
        if self.ok("jail_dir", jail, vm_id, marker):
            self.c.step(
                "jail_dir", jail, vm_id, "remove", WHY,
                lambda: self.c.host.remove_jail_dir(jail),
            )  # fmt: skip

    def run_dirs(self) -> None:
        for run_dir in _subdirs(self.c.run_root / names.VMS_DIR):
            vm_id = run_dir.name
            if not names.is_valid_id(vm_id) or not self.candidate(vm_id):
                continue
            live = [s for s in _sockets_in(run_dir) if socket_answers(s)]
            if live:
                self.c.add(
                    "run_dir", run_dir, vm_id, "skipped",
                    f"no record, but its socket {live[0]} answers; stop that VM first",
                )  # fmt: skip
                continue
            if self.ok("run_dir", run_dir, vm_id, run_dir):
                self.c.step(
                    "run_dir", run_dir, vm_id, "remove", WHY,
                    lambda p=run_dir: self.c.host.remove_run_dir(p),  # type: ignore[misc]
                )  # fmt: skip

    def cgroups(self, records: Sequence[VmRecord]) -> None:
        host = self.c.host
        for parent in host.cgroup_parent_dirs(records):
            removed = False
            for cg in _subdirs(parent):
                vm_id = cg.name
                if not names.is_valid_id(vm_id) or not self.candidate(vm_id):
                    continue
                listed = host.cgroup_pids(cg)
                if listed:
                    self._busy[vm_id] = sorted({*self.users(vm_id), *listed})
                if not self.ok("cgroup", cg, vm_id, cg):
                    continue

                def rm(p: Path = cg) -> None:
                    with host.cgroup_lock():
                        host.rmdir_cgroup(p)

                removed |= self.c.step("cgroup", cg, vm_id, "remove", WHY, rm)
            if removed and not self.c.dry_run and parent.name == names.PARENT_CGROUP_NAME:
                with host.cgroup_lock():
                    host.remove_empty_cgroup(parent)  # other VMs' cgroups keep it busy
        if not self.c.dry_run and self.c.vm_ids is None:
            with contextlib.suppress(Exception):
                for path in host.sweep_cgroup_ledger():
                    self.c.add("cgroup", path, None, "removed", "intermediate cgroup no VM uses")

    def state_files(self) -> None:
        for path in sorted(self.c.registry.state_dir.iterdir()):
            name = path.name
            vm_id: str | None
            if name.startswith(".") and name.endswith(".tmp"):
                vm_id = name[1:].split(".", 1)[0]
                reason = "interrupted write"
            elif name.startswith(".config-") and name.endswith(".json"):
                vm_id = None
                reason = "config never picked up by a supervisor"
            elif name.endswith(".log") and not name.startswith("."):
                vm_id = name.removesuffix(".log")
                if vm_id in self.known:
                    continue
                reason = "log of a VM with no record"
            else:
                continue
            if not self.c.wanted(vm_id) or not path.is_file() or path.is_symlink():
                continue
            if vm_id not in self.c.released and age_s(path) < self.c.grace_s:
                continue
            self.c.step("file", path, vm_id, "remove", reason, path.unlink)


def orphans_pass(c: Collector, records: Sequence[VmRecord]) -> None:
    """Remove unrecorded resources of ours that no process uses (see module docstring)."""
    o = _Orphans(c)
    o.netns()
    o.jails()
    o.run_dirs()
    o.cgroups(records)
    o.state_files()
