"""A fake cgroup "kernel" on a plain directory tree, as strict as the kernel it stands for.

``root/<name>`` is one hierarchy: ``unified`` is cgroup v2, any other name a v1 hierarchy of
the controllers in its name (``cpu``, ``memory``, ``cpu,cpuacct``). The rules enforced, each
one a way a looser fake let broken code pass:

* only interface files exist: ``mkdir`` makes the files the kernel makes, for the
  controllers the cgroup has; a write never creates a file (``ENOENT``);
* cgroup v2 "no internal processes": a non-root cgroup holding processes cannot enable
  controllers for its children, and one that has enabled some cannot take processes
  (``EBUSY``); ``+ctrl`` needs ``ctrl`` in the cgroup's own ``cgroup.controllers``;
* killed processes leave asynchronously: after ``cgroup.kill`` (v2 only) or a SIGKILL they
  are still listed until ``drain_polls`` later reads of ``cgroup.procs``/``tasks``/
  ``cgroup.events``; ``rmdir`` of a cgroup with processes or child cgroups is ``EBUSY``.

State a test plants (``memory.usage_in_bytes``, a root's ``cgroup.procs``) is written with
``Path.write_text``: that is the kernel's side. No real process is ever signalled.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from ironclaw_orchestrator.vm.cgroups import CgroupFs

V1_CORE = {"cgroup.procs": "", "tasks": "", "notify_on_release": "0", "cgroup.clone_children": "0"}
V1_FILES: dict[str, dict[str, str]] = {
    "cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "-1", "cpu.shares": "1024",
            "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0"},
    "cpuacct": {"cpuacct.usage": "0", "cpuacct.stat": "user 0\nsystem 0"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": "", "cpuset.effective_cpus": "",
               "cpuset.effective_mems": ""},
    "memory": {"memory.limit_in_bytes": "9223372036854771712",
               "memory.soft_limit_in_bytes": "9223372036854771712",
               "memory.usage_in_bytes": "0", "memory.max_usage_in_bytes": "0",
               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0",
               "memory.stat": ""},
    "blkio": {f"blkio.throttle.{k}": "" for k in (
        "read_bps_device", "write_bps_device", "read_iops_device", "write_iops_device",
        "io_service_bytes", "io_serviced")},
    "pids": {"pids.max": "max", "pids.current": "0", "pids.events": "max 0"},
}  # fmt: skip
V2_CORE = {
    "cgroup.procs": "", "cgroup.threads": "", "cgroup.controllers": "",
    "cgroup.subtree_control": "", "cgroup.events": "", "cgroup.type": "domain",
    "cgroup.kill": "", "cgroup.freeze": "0", "cgroup.max.depth": "max",
    "cgroup.max.descendants": "max", "cgroup.stat": "nr_descendants 0",
    "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0",
}  # fmt: skip
V2_FILES: dict[str, dict[str, str]] = {
    "cpu": {"cpu.max": "max 100000", "cpu.weight": "100"},
    "memory": {"memory.max": "max", "memory.high": "max", "memory.low": "0", "memory.min": "0",
               "memory.current": "0", "memory.peak": "0", "memory.stat": "",
               "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0"},
    "io": {"io.max": "", "io.stat": "", "io.weight": "default 100"},
    "pids": {"pids.max": "max", "pids.current": "0", "pids.events": "max 0"},
    "cpuset": {"cpuset.cpus": "", "cpuset.mems": "", "cpuset.cpus.effective": "",
               "cpuset.mems.effective": ""},
}  # fmt: skip
_POLLED = ("cgroup.procs", "tasks", "cgroup.events")


def _err(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


class FakeKernel(CgroupFs):
    """cgroupfs semantics on plain directories under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, drain_polls: int = 2) -> None:
        self.root = root
        self.drain_polls = drain_polls
        self.fail: dict[tuple[str, str | None], int] = {}  # (file name, value|None) -> errno
        self.killed: list[int] = []
        self.writes: list[tuple[Path, str]] = []
        #: pid -> polls left before it leaves every cgroup (killed, exiting).
        self.dying: dict[int, int] = {}

    # ------------------------------------------------------------------ where am I

    def hierarchy(self, path: Path) -> Path:
        return self.root / path.relative_to(self.root).parts[0]

    def is_v2(self, path: Path) -> bool:
        return self.hierarchy(path).name == "unified"

    def is_root(self, cgroup: Path) -> bool:
        return cgroup == self.hierarchy(cgroup)

    def pids(self, cgroup: Path) -> list[str]:
        procs = cgroup / "cgroup.procs"
        return procs.read_text().split() if procs.exists() else []

    def populated(self, cgroup: Path) -> bool:
        return any(self.pids(Path(d)) for d, _, _ in os.walk(cgroup))

    # ------------------------------------------------------------------ CgroupFs

    def read(self, path: Path) -> str:
        if path.name in _POLLED:
            self._poll()
        if path.name == "cgroup.kill":
            raise _err(errno.EINVAL, path)  # write-only
        if path.name == "cgroup.events" and path.exists():
            return f"populated {int(self.populated(path.parent))}\nfrozen 0\n"
        return super().read(path)

    def write(self, path: Path, value: str) -> None:
        for key in ((path.name, value), (path.name, None), (str(path), None)):
            if key in self.fail:
                raise _err(self.fail[key], path)
        if not path.exists():  # the kernel never creates a file on write (no O_CREAT)
            raise _err(errno.ENOENT, path)
        self.writes.append((path, value))
        cg = path.parent
        if path.name == "cgroup.subtree_control":
            self._subtree_control(cg, value)
        elif path.name in ("cgroup.procs", "tasks"):
            self._attach(cg, value.strip())
        elif path.name == "cgroup.kill":
            if value.strip() != "1":
                raise _err(errno.EINVAL, path)
            for d, _, _ in os.walk(cg):
                for pid in self.pids(Path(d)):
                    self.kill(int(pid))
        else:
            path.write_text(value + "\n")

    def mkdir(self, path: Path) -> None:
        if path.exists():
            raise _err(errno.EEXIST, path)  # the VFS finds the name before cgroupfs is asked
        if not (path.parent / "cgroup.procs").exists():
            raise _err(errno.ENOENT, path)  # cgroups are only made inside cgroups
        os.mkdir(path)
        if self.is_v2(path):
            files = dict(V2_CORE)
            enabled = self._words(path.parent / "cgroup.subtree_control")
            files["cgroup.controllers"] = " ".join(sorted(enabled))
            for ctrl in enabled:
                files.update(self._v2_files(path.parent, ctrl))
        else:
            files = dict(V1_CORE)
            for ctrl in self.hierarchy(path).name.split(","):
                files.update(V1_FILES.get(ctrl, {}))
        for name, content in files.items():
            (path / name).write_text(content + "\n" if content else "")

    def rmdir(self, path: Path) -> None:
        if not path.exists():
            raise _err(errno.ENOENT, path)
        if any(p.is_dir() for p in path.iterdir()) or self.pids(path):
            raise _err(errno.EBUSY, path)
        for f in path.iterdir():
            f.unlink()
        os.rmdir(path)

    def has_child_cgroups(self, path: Path) -> bool:
        # Not the link count of the plain tree (some file systems keep it at 1).
        return path.is_dir() and any(p.is_dir() for p in path.iterdir())

    def exited(self, pid: int) -> None:
        """A process ended and was reaped: the kernel takes it out of every cgroup."""
        self.dying.pop(pid, None)
        self._drop(str(pid), self.root)

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        self.killed.append(pid)
        self.dying.setdefault(pid, self.drain_polls)

    # ------------------------------------------------------------------ rules

    @staticmethod
    def _words(path: Path) -> set[str]:
        return set(path.read_text().split()) if path.exists() else set()

    def _v2_files(self, parent: Path, ctrl: str) -> dict[str, str]:
        files = dict(V2_FILES.get(ctrl, {}))
        if ctrl == "cpuset":  # effective values are inherited from the parent
            for name in ("cpuset.cpus.effective", "cpuset.mems.effective"):
                src = parent / name
                files[name] = src.read_text().strip() if src.exists() else "0"
        return files

    def _subtree_control(self, cg: Path, value: str) -> None:
        ctl = cg / "cgroup.subtree_control"
        current = self._words(ctl)
        available = self._words(cg / "cgroup.controllers")
        for tok in value.split():
            op, ctrl = tok[0], tok[1:]
            if op not in "+-" or ctrl not in available:
                raise _err(errno.ENOENT if op in "+-" else errno.EINVAL, ctl)
            if op == "+" and ctrl not in current and not self.is_root(cg) and self.pids(cg):
                raise _err(errno.EBUSY, ctl)  # no internal processes
            (current.add if op == "+" else current.discard)(ctrl)
        ctl.write_text(" ".join(sorted(current)) + "\n")
        for child in (p for p in cg.iterdir() if p.is_dir()):
            (child / "cgroup.controllers").write_text(" ".join(sorted(current)) + "\n")
            for ctrl in current:
                for name, content in self._v2_files(cg, ctrl).items():
                    if not (child / name).exists():
                        (child / name).write_text(content + "\n" if content else "")

    def _attach(self, cg: Path, pid: str) -> None:
        if not pid.isdigit():
            raise _err(errno.EINVAL, cg / "cgroup.procs")
        if self.is_v2(cg) and not self.is_root(cg) and self._words(cg / "cgroup.subtree_control"):
            raise _err(errno.EBUSY, cg / "cgroup.procs")  # no internal processes
        # A process is in exactly one cgroup of a hierarchy: moving it removes it elsewhere.
        self._drop(pid, self.hierarchy(cg))
        for name in ("cgroup.procs", "tasks"):
            if (cg / name).exists():
                (cg / name).write_text((cg / name).read_text() + pid + "\n")

    def _drop(self, pid: str, top: Path) -> None:
        for name in _POLLED[:2]:
            for f in top.rglob(name):
                kept = [p for p in f.read_text().split() if p != pid]
                f.write_text("".join(f"{p}\n" for p in kept))

    def _poll(self) -> None:
        """One poll passes for every dying process; those whose time is up leave."""
        for pid in list(self.dying):
            self.dying[pid] -= 1
            if self.dying[pid] <= 0:
                del self.dying[pid]
                self._drop(str(pid), self.root)
