"""Garbage collection: remove what crashed orchestrators left behind, and nothing else.

Two passes:

1. **Records whose owner is dead** (its pid is gone, or now belongs to a process with another
   start time). Their VMM is killed if it is still the same process (pid + start time,
   signalled through a pidfd so a recycled pid is never hit) and reaped if it is our child;
   then exactly the resources the record names are removed: cgroups (from the recorded
   ``VmCgroups.to_dict()``), tap and network namespace (only if the record says we created
   them), jail directory, run directory, a stale API socket, and finally the record itself.
   If any step fails the record is kept, so the next run retries.

2. **Orphans**: resources with no record, that are unmistakably ours:

   * network namespaces named ``ironclaw-<id>`` (our reserved prefix);
   * jail directories ``<chroot base>/<exec name>/<id>`` that contain our marker file
     :data:`JAIL_MARKER` (written when the jail is staged; a jail without it is never
     touched);
   * run directories ``<run root>/vms/<id>``;
   * cgroups ``<mount>/<parent>/<id>`` where ``<parent>`` is a recorded parent or our
     default ``<own cgroup>/ironclaw``;
   * temporary, config and log files in the state directory.

   An orphan that is still in use (a process inside the netns or cgroup, a live VMM in the
   jail, an API socket that answers) is reported and skipped: it may belong to a VM started
   without the registry. Orphans younger than ``orphan_grace_s`` are skipped as well, since
   they may be a VM being started right now by code that does not use the registry.

``dry_run=True`` computes and reports the same actions without touching anything. The
result is a :class:`GcReport` (``to_dict()`` is JSON-able).

Call :func:`collect_garbage` from a thread when inside an event loop
(``await asyncio.to_thread(collect_garbage, registry)``): the netlink helpers it uses run
their own loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import shutil
import signal
import socket
import stat
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import IronclawError
from .registry import Registry, VmRecord, is_alive, read_process_start
from .vm.config import DEFAULT_PARENT_CGROUP_NAME
from .vm.jailer import JAIL_MARKER
from .vm.netns import NETNS_PREFIX

__all__ = [
    "JAIL_MARKER",
    "GcAction",
    "GcHost",
    "GcReport",
    "collect_garbage",
]

#: Our marker in ``<chroot base>/<exec name>/<id>/`` (outside the chroot ``root/``, so the
#: guest never sees it). gc removes an unrecorded jail directory only if it holds this file.
# One name each, shared with the code that creates them.
PARENT_CGROUP_NAME = DEFAULT_PARENT_CGROUP_NAME
DEFAULT_CHROOT_BASES: tuple[Path, ...] = (Path("/var/jail"),)
DEFAULT_ORPHAN_GRACE_S = 30.0
_ID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass
class GcAction:
    """One thing gc did, would do (dry run), or left alone."""

    kind: str  # vmm, owner, cgroups, cgroup, tap, netns, jail_dir, run_dir, socket, record, file
    name: str
    vm_id: str | None
    #: killed, reaped, removed, moved aside, would kill, would remove, ..., skipped, failed
    action: str
    reason: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcReport:
    dry_run: bool
    actions: list[GcAction] = field(default_factory=list)
    #: Ids whose owner is alive: left alone.
    live: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(a.error for a in self.actions)

    @property
    def errors(self) -> list[GcAction]:
        return [a for a in self.actions if a.error]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "ok": self.ok,
            "live": list(self.live),
            "actions": [a.to_dict() for a in self.actions],
        }


# --------------------------------------------------------------------------- host access


class GcHost:
    """What gc does to the host, in one place (unit tests replace parts of it)."""

    def __init__(self, netns_dir: Path = Path("/run/netns"), proc: Path = Path("/proc")) -> None:
        self.netns_dir = netns_dir
        self.proc = proc

    # -- network namespaces
    def list_netns(self) -> list[str]:
        try:
            names = os.listdir(self.netns_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(NETNS_PREFIX))

    def netns_users(self, name: str) -> list[int]:
        """Pids of processes inside the named network namespace."""
        try:
            st = os.stat(self.netns_dir / name)
        except OSError:
            return []
        return self._pids_with_ns("net", st.st_dev, st.st_ino)

    def _pids_with_ns(self, kind: str, dev: int, ino: int) -> list[int]:
        found = []
        for entry in os.listdir(self.proc):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(self.proc / entry / "ns" / kind)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dev, ino):
                found.append(int(entry))
        return sorted(found)

    def dir_users(self, path: Path) -> list[int]:
        """Pids of processes with a file under ``path`` open, or it as cwd/root."""
        prefix = str(path).rstrip("/") + "/"
        found = []
        for entry in os.listdir(self.proc):
            if not entry.isdigit():
                continue
            base = self.proc / entry
            try:
                names = [Path("cwd"), Path("root")]
                names += [Path("fd", fd) for fd in os.listdir(base / "fd")]
            except OSError:
                continue
            links = []
            for name in names:
                with contextlib.suppress(OSError):  # closed or exited meanwhile
                    links.append(os.readlink(base / name))
            if any(link == prefix[:-1] or link.startswith(prefix) for link in links):
                found.append(int(entry))
        return sorted(found)

    def remove_tap(self, netns: str, tap: str) -> None:
        from .vm import netns as ns

        ns.remove_tap(netns, tap)

    def remove_netns(self, name: str) -> None:
        from .vm import netns as ns

        ns.remove_netns(name)

    # -- cgroups
    def remove_cgroups(self, data: dict[str, Any]) -> None:
        from .vm.cgroups import VmCgroups

        VmCgroups.from_dict(data).remove()

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
            from .vm.cgroups import detect_layout

            layout = detect_layout()
            mounts = set(layout.v1_mounts.values())
            if layout.unified_mount is not None:
                mounts.add(layout.unified_mount)
            for mount in mounts:
                for own in set(layout.own_paths.values()):
                    visible = layout.visible_path(mount, own)
                    if visible is not None:
                        dirs.add(mount / visible / PARENT_CGROUP_NAME)
        # Only parents carrying our reserved name: an explicit parent_cgroup may hold cgroups
        # that are not ours (a recorded VM's own cgroups are removed through its record).
        return sorted(d for d in dirs if d.name == PARENT_CGROUP_NAME)

    def cgroup_pids(self, path: Path) -> list[int]:
        pids: set[int] = set()
        for dirpath, _dirs, files in os.walk(path):
            for name in ("cgroup.procs", "tasks"):
                if name in files:
                    with contextlib.suppress(OSError, ValueError):
                        text = Path(dirpath, name).read_text()
                        pids.update(int(x) for x in text.split())
        return sorted(pids)

    def rmdir_cgroup(self, path: Path) -> None:
        """Remove a cgroup and its child cgroups (deepest first); they must hold no process."""
        for dirpath, dirnames, _files in os.walk(path, topdown=False):
            for d in dirnames:
                os.rmdir(Path(dirpath, d))
        os.rmdir(path)

    @contextlib.contextmanager
    def cgroup_lock(self) -> Iterator[None]:
        from .vm.cgroups import HostLock

        with HostLock():
            yield

    # -- processes
    def kill(self, pid: int, start_time: int, timeout_s: float) -> str:
        """SIGKILL ``pid`` if it is still the process started at ``start_time``; wait; reap.

        Returns what happened: ``killed``, ``gone``; raises ``OSError`` if it survives.
        """
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return "gone"
        try:
            # The pidfd pins the process: if the start time matches now, we signal the right one.
            if not is_alive(pid, start_time, self.proc):
                _reap(fd)
                return "gone"
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(timeout_s * 1000):
                raise OSError(
                    errno.ETIMEDOUT,
                    f"pid {pid} is still alive {timeout_s:g}s after SIGKILL (uninterruptible "
                    f"sleep? see /proc/{pid}/stack)",
                )
            _reap(fd)
            return "killed"
        finally:
            os.close(fd)

    def reap_zombie(self, pid: int, start_time: int) -> bool:
        """Reap ``pid`` if it is an exited child of ours with that start time."""
        if read_process_start(pid, self.proc) != start_time or is_alive(pid, start_time, self.proc):
            return False
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        try:
            return _reap(fd)
        finally:
            os.close(fd)

    def jail_vmm(self, jail_dir: Path) -> tuple[int, int] | None:
        """``(pid, start time)`` of a live VMM chrooted in ``jail_dir/root``, from its pid file."""
        root = jail_dir / "root"
        pid_file = root / f"{jail_dir.parent.name}.pid"
        try:
            pid = int(pid_file.read_text().strip())
            want = os.stat(root)
            got = os.stat(self.proc / str(pid) / "root")
        except (OSError, ValueError):
            return None
        start = read_process_start(pid, self.proc)
        if (want.st_dev, want.st_ino) != (got.st_dev, got.st_ino) or start is None:
            return None
        return (pid, start) if is_alive(pid, start, self.proc) else None


def _reap(pidfd: int) -> bool:
    """Reap the process behind ``pidfd`` if it is our exited child; True if reaped."""
    try:
        return os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None
    except ChildProcessError:
        return False


def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _age_s(path: Path) -> float:
    try:
        return time.time() - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _err(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- collector


class _Collector:
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
        self.busy: dict[str, list[int]] = {}

    def wanted(self, vm_id: str | None) -> bool:
        return self.vm_ids is None or vm_id in self.vm_ids

    def add(self, kind: str, name: object, vm_id: str | None, action: str, reason: str) -> GcAction:
        act = GcAction(kind, str(name), vm_id, action, reason)
        self.report.actions.append(act)
        return act

    def step(
        self, kind: str, name: object, vm_id: str | None, verb: str, reason: str, fn: Any
    ) -> bool:
        """Do ``fn()`` (unless dry run) and report it; False if it failed."""
        planned = {"kill": "would kill", "remove": "would remove", "move aside": "would move aside"}
        done = {"kill": "killed", "remove": "removed", "move aside": "moved aside"}
        if self.dry_run:
            self.add(kind, name, vm_id, planned[verb], reason)
            return True
        act = self.add(kind, name, vm_id, done[verb], reason)
        try:
            outcome = fn()
        except Exception as exc:
            act.action = "failed"
            act.error = _err(exc)
            return False
        if isinstance(outcome, str) and outcome == "gone":
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
                lambda p=problem.path: self.registry.quarantine(p),
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
        ok = True
        if not self.dry_run and self.host.reap_zombie(rec.owner_pid, rec.owner_start_time):
            self.add("owner", rec.owner_pid, vm_id, "reaped", "exited child of ours")
        if rec.vmm_pid is not None and rec.vmm_start_time is not None:
            if is_alive(rec.vmm_pid, rec.vmm_start_time, self.host.proc):
                ok &= self.step(
                    "vmm",
                    rec.vmm_pid,
                    vm_id,
                    "kill",
                    why,
                    lambda: self.host.kill(
                        rec.vmm_pid or 0, rec.vmm_start_time or 0, self.kill_timeout_s
                    ),
                )
            elif not self.dry_run and self.host.reap_zombie(rec.vmm_pid, rec.vmm_start_time):
                self.add("vmm", rec.vmm_pid, vm_id, "reaped", "exited child of ours")
        ok &= self.kill_unrecorded_vmm(rec, why)
        if rec.cgroups is not None:
            data = rec.cgroups
            ok &= self.step(
                "cgroups",
                _cgroup_name(data),
                vm_id,
                "remove",
                why,
                lambda: self.host.remove_cgroups(data),
            )
        if rec.netns_name is not None:
            netns = rec.netns_name
            if rec.tap is not None:
                tap = rec.tap
                ok &= self.step(
                    "tap",
                    f"{netns}/{tap}",
                    vm_id,
                    "remove",
                    why,
                    lambda: self.host.remove_tap(netns, tap),
                )
            ok &= self.step(
                "netns", netns, vm_id, "remove", why, lambda: self.host.remove_netns(netns)
            )
        removed_dirs: list[Path] = []
        for kind, path in (("jail_dir", rec.jail_dir), ("run_dir", rec.run_dir)):
            if path is None:
                continue
            problem = self._unsafe_dir(kind, path, vm_id)
            if problem:
                act = self.add(kind, path, vm_id, "skipped", why)
                act.error = problem
                ok = False
                continue
            removed_dirs.append(path)
            if os.path.lexists(path):
                ok &= self.step(kind, path, vm_id, "remove", why, lambda p=path: shutil.rmtree(p))
        sock = rec.api_socket
        if (
            sock is not None
            and not any(d == sock or d in sock.parents for d in removed_dirs)
            and _is_socket(sock)
            and not _socket_answers(sock)
        ):
            ok &= self.step("socket", sock, vm_id, "remove", "stale API socket", sock.unlink)
        if ok:
            self.step(
                "record",
                self.registry.record_path(vm_id),
                vm_id,
                "remove",
                why,
                lambda: self.registry.release(vm_id),
            )
            self.released.add(vm_id)
        else:
            self.add(
                "record",
                self.registry.record_path(vm_id),
                vm_id,
                "skipped",
                "kept because some cleanup failed; run `ironclaw gc` again",
            )

    def kill_unrecorded_vmm(self, rec: VmRecord, why: str) -> bool:
        """A VMM started after the claim but before its pid was recorded (owner died mid-start).

        Found through the jail's pid file; only jails created after the record was claimed
        count, so a same-named jail of a VM started without the registry is left alone.
        """
        if rec.vmm_pid is not None:
            return True
        claimed = rec.created_at.timestamp()
        ok = True
        for jail in self._jail_candidates(rec.vm_id):
            try:
                made = os.lstat(jail).st_mtime
            except OSError:
                continue
            if made + 1.0 < claimed:
                continue
            found = self.host.jail_vmm(jail)
            if found is None:
                continue
            pid, start = found
            ok &= self.step(
                "vmm",
                pid,
                rec.vm_id,
                "kill",
                f"{why}; VMM found in {jail}",
                lambda p=pid, s=start: self.host.kill(p, s, self.kill_timeout_s),
            )
        return ok

    def _jail_candidates(self, vm_id: str) -> list[Path]:
        out = []
        for base in self.chroot_bases:
            try:
                exec_dirs = sorted(base.iterdir())
            except OSError:
                continue
            for exec_dir in exec_dirs:
                if _is_real_dir(exec_dir) and _is_real_dir(exec_dir / vm_id):
                    out.append(exec_dir / vm_id)
        return out

    def _unsafe_dir(self, kind: str, path: Path, vm_id: str) -> str | None:
        """Why a recorded directory must not be deleted (a corrupt record must not hurt)."""
        if not path.is_absolute() or path.name != vm_id or ".." in path.parts:
            return f"recorded {kind} {path} is not a directory named after VM {vm_id}; not removed"
        if kind == "run_dir" and path.parent.name != "vms":
            return f"recorded run_dir {path} is not <run root>/vms/{vm_id}; not removed"
        if kind == "jail_dir" and len(path.parts) < 4:
            return f"recorded jail_dir {path} is not <chroot base>/<exec>/{vm_id}; not removed"
        if os.path.islink(path):
            return f"recorded {kind} {path} is a symlink; not removed"
        return None

    # ------------------------------------------------------------------ pass 2

    def known_ids(self) -> set[str]:
        return {r.vm_id for r in self.registry.scan().records}

    def too_young(self, vm_id: str, path: Path) -> bool:
        return vm_id not in self.released and _age_s(path) < self.grace_s

    def orphan_ok(
        self, kind: str, name: object, vm_id: str, path: Path | None, users: Sequence[int]
    ) -> bool:
        if users:
            pids = ", ".join(map(str, users[:10]))
            self.add(
                kind,
                name,
                vm_id,
                "skipped",
                f"no record, but in use by pid {pids} (a VM started without the registry?);"
                " stop it first",
            )
            return False
        if path is not None and self.too_young(vm_id, path):
            self.add(
                kind,
                name,
                vm_id,
                "skipped",
                f"no record, but younger than {self.grace_s:g}s (may be starting)",
            )
            return False
        return True

    def orphans_pass(self, records: Sequence[VmRecord]) -> None:
        known = self.known_ids()
        why = "no record (left behind by a crash)"
        netns = [
            (name, name[len(NETNS_PREFIX) :])
            for name in self.host.list_netns()
            if _ID_RE.match(name[len(NETNS_PREFIX) :])
        ]
        netns_users = {name: self.host.netns_users(name) for name, _ in netns}
        #: ids of which some resource is in use: none of their resources is touched.
        self.busy = {vm_id: netns_users[name] for name, vm_id in netns if netns_users[name]}
        jails = [j for base in self.chroot_bases for j in self._marked_jails(base)]
        jail_users: dict[Path, list[int]] = {}
        for jail in jails:
            if jail.name in known or not self.wanted(jail.name):
                continue
            vmm = self.host.jail_vmm(jail)
            jail_users[jail] = sorted({*([vmm[0]] if vmm else []), *self.host.dir_users(jail)})
            if jail_users[jail]:
                self.busy.setdefault(jail.name, jail_users[jail])
        for name, vm_id in netns:
            if vm_id in known or not self.wanted(vm_id):
                continue
            if self.orphan_ok("netns", name, vm_id, None, self.busy.get(vm_id, [])):
                self.step(
                    "netns", name, vm_id, "remove", why, lambda n=name: self.host.remove_netns(n)
                )
        for jail, users in jail_users.items():
            vm_id = jail.name
            if self.orphan_ok(
                "jail_dir", jail, vm_id, jail / JAIL_MARKER, users or self.busy.get(vm_id, [])
            ):
                self.step("jail_dir", jail, vm_id, "remove", why, lambda p=jail: shutil.rmtree(p))
        vms = self.run_root / "vms"
        for run_dir in _subdirs(vms):
            vm_id = run_dir.name
            if not _ID_RE.match(vm_id) or vm_id in known or not self.wanted(vm_id):
                continue
            live = [s for s in _sockets_in(run_dir) if _socket_answers(s)]
            if live:
                self.add(
                    "run_dir",
                    run_dir,
                    vm_id,
                    "skipped",
                    f"no record, but its socket {live[0]} answers; stop that VM first",
                )
                continue
            users = self.busy.get(vm_id) or self.host.dir_users(run_dir)
            if self.orphan_ok("run_dir", run_dir, vm_id, run_dir, users):
                self.step(
                    "run_dir", run_dir, vm_id, "remove", why, lambda p=run_dir: shutil.rmtree(p)
                )
        self.orphan_cgroups(records, known, why)
        self.state_files(known)

    def _marked_jails(self, base: Path) -> list[Path]:
        out = []
        for exec_dir in _subdirs(base):
            for jail in _subdirs(exec_dir):
                marker = jail / JAIL_MARKER
                if _ID_RE.match(jail.name) and marker.is_file() and not marker.is_symlink():
                    out.append(jail)
        return out

    def orphan_cgroups(self, records: Sequence[VmRecord], known: set[str], why: str) -> None:
        for parent in self.host.cgroup_parent_dirs(records):
            removed = False
            for cg in _subdirs(parent):
                vm_id = cg.name
                if not _ID_RE.match(vm_id) or vm_id in known or not self.wanted(vm_id):
                    continue
                users = self.host.cgroup_pids(cg) or self.busy.get(vm_id, [])
                if not self.orphan_ok("cgroup", cg, vm_id, cg, users):
                    continue

                def rm(p: Path = cg) -> None:
                    with self.host.cgroup_lock():
                        self.host.rmdir_cgroup(p)

                removed |= self.step("cgroup", cg, vm_id, "remove", why, rm)
            if removed and not self.dry_run and parent.name == PARENT_CGROUP_NAME:
                with self.host.cgroup_lock(), contextlib.suppress(OSError):
                    os.rmdir(parent)  # only if empty: other VMs' cgroups keep it busy

    def state_files(self, known: set[str]) -> None:
        for path in sorted(self.registry.state_dir.iterdir()):
            name = path.name
            if name.startswith(".") and name.endswith(".tmp"):
                vm_id = name[1:].split(".", 1)[0]
                reason = "interrupted write"
            elif name.startswith(".config-") and name.endswith(".json"):
                vm_id = None
                reason = "config never picked up by a supervisor"
            elif name.endswith(".log") and not name.startswith("."):
                vm_id = name.removesuffix(".log")
                if vm_id in known:
                    continue
                reason = "log of a VM with no record"
            else:
                continue
            if not self.wanted(vm_id) or not path.is_file() or path.is_symlink():
                continue
            if vm_id not in self.released and _age_s(path) < self.grace_s:
                continue
            self.step("file", path, vm_id, "remove", reason, path.unlink)


def _cgroup_name(data: dict[str, Any]) -> str:
    parent = str(data.get("parent", "")).strip("/")
    return f"{parent}/{data.get('vm_id', '?')}"


def _subdirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if _is_real_dir(p))
    except OSError:
        return []


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _sockets_in(path: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(path):
        out += [Path(dirpath, f) for f in files if _is_socket(Path(dirpath, f))]
    return out


def collect_garbage(
    registry: Registry,
    *,
    dry_run: bool = False,
    chroot_bases: Sequence[Path] = DEFAULT_CHROOT_BASES,
    run_root: Path | None = None,
    vm_ids: Collection[str] | None = None,
    orphan_grace_s: float = DEFAULT_ORPHAN_GRACE_S,
    kill_timeout_s: float = 5.0,
    host: GcHost | None = None,
) -> GcReport:
    """Clean up VMs whose owner died, and orphaned resources of ours (see module docstring).

    ``vm_ids`` limits gc to those ids. ``run_root`` defaults to ``$IRONCLAW_RUN_DIR`` or
    ``/run/ironclaw``. Never raises for a failed step: each is in the report with its error.
    """
    if run_root is None:
        from .vm.rundir import run_root as default_run_root

        run_root = default_run_root()
    collector = _Collector(
        registry,
        dry_run=dry_run,
        chroot_bases=chroot_bases,
        run_root=run_root,
        vm_ids=vm_ids,
        orphan_grace_s=orphan_grace_s,
        kill_timeout_s=kill_timeout_s,
        host=host or GcHost(),
    )
    collector.records_pass()
    collector.orphans_pass([*collector.initial_records, *registry.scan().records])
    return collector.report
