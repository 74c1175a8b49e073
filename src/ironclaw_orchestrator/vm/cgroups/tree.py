"""One VM's cgroup directories: plan, create + fill (before the VMM exists), attach, remove.

Layout: ``<mount of each controller>/<parent>/<vm_id>``; ``<parent>`` is what the jailer gets
as ``--parent-cgroup``. It defaults to ``<deepest own cgroup>/ironclaw`` (the orchestrator's
own cgroup among the controllers used, when they nest), so nothing is created outside the
orchestrator's own subtree unless ``parent_cgroup`` is given.

The orchestrator creates the directories and writes every value itself, so a value the kernel
rejects is a :class:`CgroupError` before anything is spawned; the jailer then writes the same
values again (``--cgroup``) and attaches the VMM. Controllers the jailer cannot handle
(``blkio`` on v1, because ``blkio.throttle.*`` does not parse as ``--cgroup``; ``cpuacct`` on
v1, which has no setting to pass at all) are attached by :meth:`VmCgroups.attach` right after
the VMM is spawned; on v2 there is one directory, attached by the jailer (``io.max`` is
written by us and applies as soon as the jailer attaches the VMM).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ...errors import CgroupError, CleanupError, ConfigError
from ...names import PARENT_CGROUP_NAME as DEFAULT_PARENT_CGROUP_NAME
from ...names import is_valid_id, vm_cgroup_path
from . import drain, ledger
from .fs import CgroupFs, read_optional, read_pids
from .layout import (
    CgroupLayout,
    controller_names,
    is_ancestor_or_equal,
    missing_controllers,
    unavailable_error,
)
from .limits import CgroupSetting, jailer_cgroup_args, setting
from .lock import DEFAULT_LOCK_PATH, HostLock
from .rejections import errname, write_error
from .stats import CgroupStats, parse_flat_keyed, read_stats

Version = Literal[1, 2]
UNIFIED = "unified"
_FORMAT = 1


def _depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _norm_parent(value: str) -> str:
    parts = [p for p in value.strip("/").split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise ConfigError(f"parent_cgroup {value!r} must be a relative path like 'ironclaw'")
    return "/".join(parts)


@dataclass
class VmCgroups:
    """The cgroups of one VM. Build with :meth:`plan` (or :meth:`from_dict` after a crash)."""

    version: Version
    vm_id: str
    #: ``--parent-cgroup``: relative to every hierarchy's mount point.
    parent: str
    explicit_parent: bool
    settings: list[CgroupSetting]
    #: key (v1 controller, or ``"unified"``) -> hierarchy mount point.
    mounts: dict[str, Path]
    #: key -> the orchestrator's own cgroup, relative to that mount (``""`` = its root).
    own: dict[str, str]
    #: controllers used (v1: including ``cpuacct`` when cpu limits are set).
    controllers: tuple[str, ...]
    #: keys whose VM directory :meth:`attach` must put the VMM into.
    attach_keys: tuple[str, ...]
    lock_path: Path = DEFAULT_LOCK_PATH
    #: directories this object created, in creation order.
    created: list[Path] = field(default_factory=list)
    prepared: bool = False
    fs: CgroupFs = field(default_factory=CgroupFs, compare=False, repr=False)

    # ------------------------------------------------------------------ planning

    @classmethod
    def plan(
        cls,
        layout: CgroupLayout,
        version: Version,
        vm_id: str,
        settings: list[CgroupSetting],
        parent_cgroup: str | None,
        lock_path: Path = DEFAULT_LOCK_PATH,
        fs: CgroupFs | None = None,
    ) -> VmCgroups:
        """Decide directories and parent; touches nothing (see :meth:`prepare`)."""
        if not is_valid_id(vm_id):
            raise ConfigError(
                f"vm_id {vm_id!r} is invalid for a cgroup name: use 1 to 64 characters from "
                "A-Z, a-z, 0-9 and '-'"
            )
        used = {s.controller for s in settings}
        if version == 1 and "cpu" in used:
            used.add("cpuacct")  # per-VM CPU usage: cpuacct is its own hierarchy on many hosts
        controllers = tuple(controller_names(used, version))
        missing = missing_controllers(layout, version, controllers)
        if missing:
            raise unavailable_error(layout, version, missing)

        mounts: dict[str, Path] = {}
        own: dict[str, str] = {}
        keys = (UNIFIED,) if version == 2 else controllers
        for key in keys:
            mount = layout.mount_for(key, version)
            assert mount is not None  # checked by missing_controllers
            own_path = layout.own_path(key, version)
            visible = layout.visible_path(mount, own_path)
            if visible is None and parent_cgroup is None:
                raise CgroupError(
                    f"the orchestrator's own {key} cgroup {own_path} is not visible under the "
                    f"mount {mount} (it shows {layout.mount_roots.get(mount, '/')}): cannot "
                    "place VM cgroups beneath it; set JailerConfig.parent_cgroup to a path "
                    f"relative to {mount}",
                    controller=key,
                    path=str(mount),
                )
            mounts[key] = mount
            own[key] = visible or ""

        if parent_cgroup is not None:
            parent = _norm_parent(parent_cgroup)
        else:
            parent = cls._derive_parent(own)

        attach: list[str] = []
        if version == 2:
            if not any(s.via_jailer for s in settings):
                attach.append(UNIFIED)
        else:
            jailer_dirs = {mounts[s.controller] for s in settings if s.via_jailer}
            attach = [c for c in controllers if mounts[c] not in jailer_dirs]
        return cls(
            version=version,
            vm_id=vm_id,
            parent=parent,
            explicit_parent=parent_cgroup is not None,
            settings=list(settings),
            mounts=mounts,
            own=own,
            controllers=controllers,
            attach_keys=tuple(attach),
            lock_path=lock_path,
            fs=fs or CgroupFs(),
        )

    @staticmethod
    def _derive_parent(own: dict[str, str]) -> str:
        deepest = max(own.values(), key=_depth)
        diverging = {k: v for k, v in own.items() if not is_ancestor_or_equal(v, deepest)}
        if diverging:
            listing = ", ".join(f"{k}: /{v}" for k, v in sorted(own.items()))
            raise CgroupError(
                "cannot derive one --parent-cgroup for all controllers: the orchestrator's own "
                f"cgroups do not nest ({listing}), and the jailer takes a single parent path "
                "for every hierarchy. Set JailerConfig.parent_cgroup explicitly (relative to "
                f"each mount, e.g. {DEFAULT_PARENT_CGROUP_NAME!r}) to a place you may use in "
                "every hierarchy",
                controller=next(iter(sorted(diverging))),
                path=f"/{deepest}",
            )
        return _join(deepest, DEFAULT_PARENT_CGROUP_NAME)

    # ------------------------------------------------------------------ paths

    @property
    def paths(self) -> dict[str, Path]:
        """key (v1 controller or ``"unified"``) -> this VM's cgroup directory."""
        rel = vm_cgroup_path(self.parent, self.vm_id)
        return {k: m / rel for k, m in self.mounts.items()}

    def _key(self, controller: str) -> str:
        return UNIFIED if self.version == 2 else controller

    def _vm_dirs(self) -> list[Path]:
        return sorted(set(self.paths.values()))

    def jailer_args(self) -> list[str]:
        """``--cgroup-version``, ``--parent-cgroup`` and the ``--cgroup`` arguments."""
        return [
            "--cgroup-version",
            str(self.version),
            "--parent-cgroup",
            self.parent,
            *jailer_cgroup_args(self.settings),
        ]

    # ------------------------------------------------------------------ prepare

    def prepare(self) -> None:
        """Create the directories, enable controllers (v2), write every value.

        On any failure, the directories created here are removed again before raising.
        """
        with HostLock(self.lock_path):
            try:
                if self.version == 2:
                    self._prepare_v2()
                else:
                    self._prepare_v1()
                self._resolve_cpuset_mems()
                for s in self.settings:
                    self._write_setting(s)
            except BaseException as exc:
                for problem in self._remove_created():
                    exc.add_note(f"rollback: {problem}")
                try:
                    ledger.sweep(self.lock_path, self.fs, within=self._vm_dirs())
                except OSError as sweep_exc:
                    exc.add_note(f"rollback: intermediate cgroups: {sweep_exc}")
                raise
        self.prepared = True

    def _own_dir(self, key: str) -> Path:
        return self.mounts[key] / self.own[key]

    def _chain(self, key: str) -> list[Path]:
        """Directories from the mount (exclusive) down to the VM dir (inclusive)."""
        cur = self.mounts[key]
        out: list[Path] = []
        for part in [*self.parent.split("/"), self.vm_id]:
            cur = cur / part
            out.append(cur)
        return out

    def _ensure_dir(self, key: str, path: Path, vm_dir: bool) -> bool:
        """Create ``path`` if missing; ``True`` if created here."""
        if self.fs.is_dir(path):
            if vm_dir:
                raise CgroupError(
                    f"the cgroup {path} of VM {self.vm_id} already exists: a VM with this id "
                    "is running, or an earlier one was not cleaned up. Stop/clean it up "
                    "(ironclaw cleanup, or rmdir the directory once it holds no processes) "
                    "or use another id",
                    controller=key,
                    path=str(path),
                )
            return False
        own = self._own_dir(key)
        if not self.explicit_parent and not is_ancestor_or_equal(str(own), str(path)):
            raise CgroupError(
                f"refusing to create {path}: it is outside the orchestrator's own {key} "
                f"cgroup {own} (which does not exist?). Set JailerConfig.parent_cgroup to "
                "choose where VM cgroups go",
                controller=key,
                path=str(path),
            )
        try:
            self.fs.mkdir(path)
        except OSError as exc:
            raise CgroupError(
                f"cannot create cgroup directory {path} ({key}): {errname(exc)} "
                f"{exc.strerror}. Run as root, or set JailerConfig.parent_cgroup to a "
                "subtree delegated to this user",
                controller=key,
                path=str(path),
            ) from exc
        self.created.append(path)
        if not vm_dir:
            ledger.record_intermediate(self.lock_path, path)
        return True

    def _prepare_v1(self) -> None:
        by_mount: dict[Path, list[str]] = {}
        for key in self.controllers:
            by_mount.setdefault(self.mounts[key], []).append(key)
        for keys in by_mount.values():
            key = keys[0]
            chain = self._chain(key)
            for i, path in enumerate(chain):
                created = self._ensure_dir(key, path, vm_dir=i == len(chain) - 1)
                if created and "cpuset" in keys:
                    for name in ("cpuset.cpus", "cpuset.mems"):
                        self._inherit(path, name)

    def _inherit(self, path: Path, name: str) -> None:
        """v1 cpuset: a new cgroup starts with empty cpus/mems; copy the parent's."""
        src = path.parent / name
        value = read_optional(self.fs, src)
        if not value:
            raise CgroupError(
                f"cannot initialise {path / name}: the parent's {src} is "
                f"{'empty' if value == '' else 'unreadable'}. Give the parent cgroup CPUs and "
                "memory nodes first, or set JailerConfig.parent_cgroup elsewhere",
                controller="cpuset",
                path=str(src),
                value=value,
            )
        self._write(path / name, value, "cpuset", "copying the parent's value")

    def _prepare_v2(self) -> None:
        mount = self.mounts[UNIFIED]
        own = self._own_dir(UNIFIED)
        chain = [mount, *self._chain(UNIFIED)]
        for i, path in enumerate(chain):
            if i > 0:
                self._ensure_dir(UNIFIED, path, vm_dir=i == len(chain) - 1)
            if i == len(chain) - 1:
                break
            enabled = set((read_optional(self.fs, path / "cgroup.subtree_control") or "").split())
            for ctrl in self.controllers:
                if ctrl in enabled:
                    continue
                outside = path != own and is_ancestor_or_equal(str(path), str(own))
                if outside and not self.explicit_parent:
                    raise CgroupError(
                        f"controller {ctrl} is not enabled in {path}/cgroup.subtree_control, "
                        f"above the orchestrator's own cgroup {own}; ironclaw does not change "
                        f"cgroups it does not own. Enable it there (echo +{ctrl} > "
                        f"{path}/cgroup.subtree_control, or systemd Delegate=yes) or set "
                        "JailerConfig.parent_cgroup to a delegated subtree",
                        controller=ctrl,
                        path=str(path / "cgroup.subtree_control"),
                        value=f"+{ctrl}",
                    )
                self._enable(path, ctrl)

    def _enable(self, path: Path, ctrl: str) -> None:
        target = path / "cgroup.subtree_control"
        try:
            self.fs.write(target, f"+{ctrl}")
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                pids = read_pids(self.fs, path / "cgroup.procs")
                who = ", ".join(map(str, pids[:20])) or "(none listed; threads or a race)"
                mine = " (including this orchestrator)" if os.getpid() in pids else ""
                raise CgroupError(
                    f"cannot enable controller {ctrl} for child cgroups: writing '+{ctrl}' to "
                    f"{target} failed with EBUSY because the cgroup {path} holds processes "
                    f"{who}{mine}; cgroup v2's no-internal-processes rule forbids distributing "
                    "a controller from a cgroup that has processes. Set "
                    "JailerConfig.parent_cgroup to a delegated subtree that holds no "
                    "processes, e.g. run the orchestrator under systemd with Delegate=yes, "
                    "move the orchestrator itself into a leaf (such as <service>/orchestrator) "
                    "and use parent_cgroup='<service>/vms'",
                    controller=ctrl,
                    path=str(target),
                    value=f"+{ctrl}",
                ) from exc
            raise CgroupError(
                f"cannot enable controller {ctrl}: writing '+{ctrl}' to {target} failed with "
                f"{errname(exc)} {exc.strerror}. Check that {path}/cgroup.controllers lists "
                f"{ctrl}, or set JailerConfig.parent_cgroup elsewhere",
                controller=ctrl,
                path=str(target),
                value=f"+{ctrl}",
            ) from exc

    def _resolve_cpuset_mems(self) -> None:
        files = [s.file for s in self.settings]
        if "cpuset.cpus" not in files or "cpuset.mems" in files:
            return
        parent = self.paths[self._key("cpuset")].parent
        names = ("cpuset.mems",) if self.version == 1 else ("cpuset.mems.effective", "cpuset.mems")
        value = None
        for name in names:
            value = read_optional(self.fs, parent / name)
            if value:
                break
        if not value:
            raise CgroupError(
                f"cpuset_cpus is set but cpuset_mems is not, and the parent cgroup {parent} "
                "has no memory nodes to inherit: set JailerConfig.cpuset_mems (e.g. '0')",
                controller="cpuset",
                path=str(parent / names[0]),
            )
        at = files.index("cpuset.cpus") + 1
        self.settings.insert(at, setting("cpuset", "cpuset.mems", value))

    def _write_setting(self, s: CgroupSetting) -> None:
        self._write(self.paths[self._key(s.controller)] / s.file, s.value, s.controller, "")

    def _write(self, target: Path, value: str, controller: str, what: str) -> None:
        try:
            self.fs.write(target, value)
        except OSError as exc:
            raise write_error(self.fs, self.version, target, value, controller, exc, what) from exc

    # ------------------------------------------------------------------ attach

    def attach(self, pid: int, *, everywhere: bool = False) -> None:
        """Put ``pid`` (the VMM) into the cgroups the jailer does not attach it to.

        Call it right after the VMM exists (with ``--new-pid-ns`` read its host pid from the
        jail's pid file); until then its CPU time / IO is not counted in those cgroups.
        ``everywhere=True`` attaches to every VM cgroup (for running without the jailer).
        """
        keys = sorted({*self.paths} if everywhere else set(self.attach_keys))
        done: set[Path] = set()
        for key in keys:
            if self.paths[key] in done:
                continue
            done.add(self.paths[key])
            target = self.paths[key] / "cgroup.procs"
            try:
                self.fs.write(target, str(pid))
            except OSError as exc:
                gone = " (the process has exited)" if exc.errno == errno.ESRCH else ""
                raise CgroupError(
                    f"cannot attach pid {pid} to the {key} cgroup: writing {pid} to {target} "
                    f"failed with {errname(exc)} {exc.strerror}{gone}; prepare() must have "
                    "run and the VMM must still be alive",
                    controller=key,
                    path=str(target),
                    value=str(pid),
                ) from exc

    # ------------------------------------------------------------------ remove

    def _remove_created(self) -> list[str]:
        """Remove (deepest first) the directories this object created. Lock must be held."""
        failures: list[str] = []
        vm_dirs = set(self._vm_dirs())
        for path in sorted(set(self.created), key=lambda p: len(p.parts), reverse=True):
            drain.rmdir(self.fs, path, failures, tolerate_busy=path not in vm_dirs)
        if not failures:
            self.created.clear()
        return failures

    def remove(self, timeout_s: float = 5.0) -> None:
        """Kill what is left in the VM's cgroups, wait, and remove the directories.

        Only directories this object created (recorded by :meth:`prepare`, kept in
        :meth:`to_dict`) are touched. Removes the VM directories, then (under the host lock)
        the parent directories this object created, if empty (a busy parent holds another
        VM's cgroup and is left); with the derived parent (``<own>/ironclaw``), that parent
        too if it is empty. Idempotent.
        Every step runs; failures are raised together as :class:`CleanupError`.
        """
        failures: list[str] = []
        # Only directories this object created: a VM dir found pre-existing by prepare()
        # belongs to someone else (same id still running) and must not be touched.
        owned = set(self.created)
        tops = [d for d in self._vm_dirs() if d in owned and self.fs.is_dir(d)]
        drain.drain(self.fs, self.version, tops, timeout_s, failures)
        with HostLock(self.lock_path):
            for top in tops:
                for cg in drain.all_cgroups(self.fs, top):
                    drain.rmdir(self.fs, cg, failures, tolerate_busy=False)
            failures += self._remove_created()
            if owned and not self.explicit_parent:
                for key in self.mounts:
                    drain.rmdir(self.fs, self.paths[key].parent, failures, tolerate_busy=True)
            if owned:
                # Intermediate dirs another VM made for the same parent: the last one out
                # removes them (see ledger).
                try:
                    ledger.sweep(self.lock_path, self.fs, within=self._vm_dirs())
                except OSError as exc:
                    failures.append(f"intermediate cgroups: {errname(exc)} {exc.strerror}")
        self.prepared = False
        if failures:
            unique = list(dict.fromkeys(failures))
            raise CleanupError(f"removing the cgroups of VM {self.vm_id} failed", unique)

    # ------------------------------------------------------------------ stats

    def stats(self) -> CgroupStats:
        return read_stats(self.fs, self.version, self.paths)

    def oom_kills(self) -> int | None:
        """OOM kills in the VM's memory cgroup (``None`` if the kernel does not say)."""
        cg = self.paths.get(self._key("memory"))
        if cg is None:
            return None
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        text = read_optional(self.fs, cg / name)
        return None if text is None else parse_flat_keyed(text).get("oom_kill")

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": self.version,
            "vm_id": self.vm_id,
            "parent": self.parent,
            "explicit_parent": self.explicit_parent,
            "settings": [s.to_dict() for s in self.settings],
            "mounts": {k: str(v) for k, v in self.mounts.items()},
            "own": dict(self.own),
            "controllers": list(self.controllers),
            "attach_keys": list(self.attach_keys),
            "lock_path": str(self.lock_path),
            "created": [str(p) for p in self.created],
            "prepared": self.prepared,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], fs: CgroupFs | None = None) -> VmCgroups:
        if data.get("format") != _FORMAT:
            raise CgroupError(
                f"unknown cgroup record format {data.get('format')!r} (expected {_FORMAT}): "
                "the record was written by another ironclaw version; clean up by hand"
            )
        version = int(data["version"])
        if version not in (1, 2):
            raise CgroupError(f"cgroup record has invalid version {version!r}")
        vm_id = str(data["vm_id"])
        parent = _norm_parent(str(data["parent"]))
        mounts = {str(k): Path(v) for k, v in data["mounts"].items()}
        created = [Path(p) for p in data["created"]]
        # A corrupted record must never make remove() rmdir something unrelated.
        vm_dirs = {m: m / vm_cgroup_path(parent, vm_id) for m in mounts.values()}
        for p in created:
            if not any(p != m and (p == d or p in d.parents) for m, d in vm_dirs.items()):
                raise CgroupError(
                    f"cgroup record of VM {vm_id} lists {p}, which is not on the path to its "
                    "cgroups; the record is corrupt: clean up by hand"
                )
        return cls(
            version=1 if version == 1 else 2,
            vm_id=vm_id,
            parent=parent,
            explicit_parent=bool(data["explicit_parent"]),
            settings=[CgroupSetting.from_dict(s) for s in data["settings"]],
            mounts=mounts,
            own={str(k): str(v) for k, v in data["own"].items()},
            controllers=tuple(str(c) for c in data["controllers"]),
            attach_keys=tuple(str(k) for k in data["attach_keys"]),
            lock_path=Path(data["lock_path"]),
            created=created,
            prepared=bool(data.get("prepared", False)),
            fs=fs or CgroupFs(),
        )


def sweep_intermediates(
    lock_path: Path = DEFAULT_LOCK_PATH, fs: CgroupFs | None = None
) -> list[Path]:
    """Remove empty intermediate cgroup dirs made for VMs (``ironclaw gc``); return them."""
    with HostLock(lock_path):
        return ledger.sweep(lock_path, fs or CgroupFs())


def jailer_managed(settings: Iterable[CgroupSetting]) -> set[str]:
    """Controllers whose VM cgroup the jailer creates and attaches the VMM to."""
    return {s.controller for s in settings if s.via_jailer}


__all__ = ["UNIFIED", "VmCgroups", "jailer_managed", "sweep_intermediates"]
