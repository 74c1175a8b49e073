"""What gc reads from and does to the host, in one place (unit tests replace parts of it).

Removal goes through :mod:`ironclaw_orchestrator.vm.cleanup`, the functions a VM's own stop
uses; process questions through :mod:`ironclaw_orchestrator.procfs` and
:mod:`ironclaw_orchestrator.pidfd`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import names, procfs
from .. import pidfd as pidfds
from ..errors import IronclawError
from ..registry import VmRecord
from ..vm.cgroups.fs import CgroupFs, read_pids
from ..vm.cgroups.lock import DEFAULT_LOCK_PATH, HostLock

__all__ = ["GcHost"]


class GcHost:
    """The host as gc sees it: ``/proc``, ``/run/netns``, cgroup mounts, directories."""

    def __init__(
        self,
        netns_dir: Path = Path("/run/netns"),
        proc: Path = procfs.PROC,
        *,
        cgroup_fs: CgroupFs | None = None,
        cgroup_lock_path: Path = DEFAULT_LOCK_PATH,
    ) -> None:
        self.netns_dir = netns_dir
        self.proc = proc
        #: Every cgroup read and removal goes through it (tests put a fake kernel here).
        self.cgroup_fs = cgroup_fs if cgroup_fs is not None else CgroupFs()
        self.cgroup_lock_path = cgroup_lock_path
        self._cgroup_index: dict[str, list[int]] | None = None

    # -- who uses what (every process on the host, not just recorded ones)
    def list_netns(self) -> list[str]:
        try:
            found = os.listdir(self.netns_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in found if n.startswith(names.NETNS_PREFIX))

    def netns_users(self, name: str) -> list[int]:
        """Pids of processes inside the named network namespace."""
        try:
            st = os.stat(self.netns_dir / name)
        except OSError:
            return []
        found = []
        for pid in procfs.all_pids(self.proc):
            with contextlib.suppress(OSError):
                got = os.stat(self.proc / str(pid) / "ns" / "net")
                if (got.st_dev, got.st_ino) == (st.st_dev, st.st_ino):
                    found.append(pid)
        return found

    def dir_users(self, path: Path) -> list[int]:
        """Pids with ``path`` (or beneath) as root or cwd, or a file there open."""
        return procfs.pids_using_dir(path, self.proc)

    def cgroup_users(self, vm_id: str) -> list[int]:
        """Pids in a cgroup named ``vm_id`` in any hierarchy (from every process's view)."""
        if self._cgroup_index is None:
            self._cgroup_index = procfs.cgroup_index(self.proc)
        return self._cgroup_index.get(vm_id, [])

    def cgroup_pids(self, path: Path) -> list[int]:
        """Pids listed in a cgroup directory tree (``cgroup.procs`` / ``tasks``)."""
        pids: set[int] = set()
        for name in ("cgroup.procs", "tasks"):
            with contextlib.suppress(OSError):
                pids.update(read_pids(self.cgroup_fs, path / name))
        for sub in self.cgroup_fs.subdirs(path):
            pids.update(self.cgroup_pids(sub))
        return sorted(pids)

    # -- removal: the same functions a VM's stop uses
    def remove_network(self, netns: str, vm_id: str, tap: str | None, uplink: bool) -> None:
        from ..vm import cleanup

        cleanup.remove_network(netns, vm_id, tap, uplink)

    def remove_cgroups(self, data: dict[str, Any]) -> None:
        from ..vm import cleanup

        cleanup.remove_cgroups(data, self.cgroup_fs)

    def remove_jail_dir(self, path: Path) -> None:
        from ..vm import cleanup

        cleanup.remove_jail_dir(path)

    def remove_run_dir(self, path: Path) -> None:
        from ..vm import cleanup

        cleanup.remove_run_dir(path)

    def jail_processes(self, jail: Path) -> list[int]:
        """Pids with their root or cwd in ``jail`` (what stop and gc kill there)."""
        from ..vm import cleanup

        return cleanup.jail_processes(jail, self.proc)

    def kill_jail_processes(self, jail: Path, timeout_s: float) -> list[int]:
        from ..vm import cleanup

        return cleanup.kill_jail_processes(jail, timeout_s, self.proc)

    # -- cgroups of VMs with no record
    def cgroup_parent_dirs(self, records: Sequence[VmRecord]) -> list[Path]:
        """Directories holding per-VM cgroups: recorded parents plus our default parents."""
        dirs: set[Path] = set()
        for rec in records:
            data = rec.cgroups or {}
            parent = str(data.get("parent") or "").strip("/")
            if not parent:
                continue
            for mount in (data.get("mounts") or {}).values():
                dirs.add(Path(str(mount)) / parent)
        with contextlib.suppress(IronclawError, OSError):
            from ..vm.cgroups import detect_layout

            layout = detect_layout()
            mounts = set(layout.v1_mounts.values())
            if layout.unified_mount is not None:
                mounts.add(layout.unified_mount)
            for mount in mounts:
                for own in set(layout.own_paths.values()):
                    visible = layout.visible_path(mount, own)
                    if visible is not None:
                        dirs.add(mount / visible / names.PARENT_CGROUP_NAME)
        # Only parents carrying our reserved name: an explicit parent_cgroup may hold cgroups
        # that are not ours (a recorded VM's own cgroups are removed through its record).
        return sorted(d for d in dirs if d.name == names.PARENT_CGROUP_NAME)

    def rmdir_cgroup(self, path: Path) -> None:
        """Remove a cgroup and its child cgroups (deepest first); they must hold no process."""
        for sub in self.cgroup_fs.subdirs(path):
            self.rmdir_cgroup(sub)
        self.cgroup_fs.rmdir(path)

    def remove_empty_cgroup(self, path: Path) -> None:
        """``rmdir`` one cgroup if it is empty; busy (another VM's cgroup inside) is fine."""
        with contextlib.suppress(OSError):
            self.cgroup_fs.rmdir(path)

    def sweep_cgroup_ledger(self) -> list[Path]:
        """Remove empty intermediate cgroup dirs made for VMs that no VM uses any more."""
        from ..vm.cgroups.tree import sweep_intermediates

        return sweep_intermediates(self.cgroup_lock_path, self.cgroup_fs)

    @contextlib.contextmanager
    def cgroup_lock(self) -> Iterator[None]:
        with HostLock(self.cgroup_lock_path):
            yield

    # -- processes
    def kill(self, pid: int, start_time: int, timeout_s: float) -> str:
        """SIGKILL ``pid`` if it is still the process started at ``start_time``; reap it."""
        return pidfds.kill_and_reap(pid, start_time, timeout_s, self.proc)

    def reap_zombie(self, pid: int, start_time: int) -> bool:
        """Reap ``pid`` if it is an exited child of ours with that start time."""
        st = procfs.read_stat(pid, self.proc)
        if st is None or st.start_time != start_time or not st.exited:
            return False
        with pidfds.opened(pid) as fd:
            return fd is not None and pidfds.reap(fd) is not None
