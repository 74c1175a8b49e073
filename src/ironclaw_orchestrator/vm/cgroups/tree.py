"""One VM's cgroup directories: plan, create + fill (before the VMM exists), attach, remove.

The pieces live by concept: :mod:`.planning` (where the directories go, touching nothing),
:mod:`.creation` (``prepare``), :mod:`.removal` (``remove``, the ledger sweep for gc).

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import CgroupError
from ...names import vm_cgroup_path
from . import creation, removal
from .fs import CgroupFs, read_optional
from .layout import CgroupLayout
from .limits import CgroupSetting, jailer_cgroup_args, via_jailer
from .lock import DEFAULT_LOCK_PATH
from .planning import UNIFIED, Version, norm_parent
from .rejections import errname, write_error
from .removal import sweep_intermediates
from .stats import CgroupStats, parse_flat_keyed, read_stats

_FORMAT = 1

#: ``<mount>/<parent>`` by (mount, parent): the same for every VM (parsing a path is most of
#: a plan's cost). Pure strings in, so nothing to invalidate; bounded.
_parent_dirs: dict[tuple[Path, str], Path] = {}


def _parent_dir(mount: Path, parent: str) -> Path:
    found = _parent_dirs.get((mount, parent))
    if found is None:
        if len(_parent_dirs) >= 64:
            _parent_dirs.clear()
        found = Path(f"{str(mount).rstrip('/')}/{parent}") if parent else mount
        _parent_dirs[(mount, parent)] = found
    return found


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
    #: key -> VM directory, and the distinct VM directories (sorted): fixed by the fields above.
    _paths: dict[str, Path] = field(init=False, compare=False, repr=False)
    _vm_dirs: list[Path] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        head, _, leaf = vm_cgroup_path(self.parent, self.vm_id).rpartition("/")
        by_mount: dict[Path, Path] = {}
        for m in self.mounts.values():
            if m not in by_mount:
                by_mount[m] = _parent_dir(m, head) / leaf
        self._paths = {k: by_mount[m] for k, m in self.mounts.items()}
        self._vm_dirs = sorted(set(by_mount.values()))

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
        from .planning import plan

        p = plan(layout, version, vm_id, settings, parent_cgroup)
        return cls(
            version=version,
            vm_id=vm_id,
            parent=p.parent,
            explicit_parent=p.explicit_parent,
            settings=list(settings),
            mounts=dict(p.mounts),  # the plan is shared by every VM of its configuration
            own=dict(p.own),
            controllers=p.controllers,
            attach_keys=p.attach_keys,
            lock_path=lock_path,
            fs=fs or CgroupFs(),
        )

    # ------------------------------------------------------------------ paths, arguments

    @property
    def paths(self) -> dict[str, Path]:
        """key (v1 controller or ``"unified"``) -> this VM's cgroup directory."""
        return dict(self._paths)

    def _key(self, controller: str) -> str:
        return UNIFIED if self.version == 2 else controller

    def jailer_settings(self) -> list[CgroupSetting]:
        """The settings the jailer takes as ``--cgroup FILE=VALUE`` (in write order)."""
        return via_jailer(self.settings)

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
        creation.prepare(self)

    def prepare_lock_free(self) -> bool:
        """:meth:`prepare` if it needs neither the host lock nor a wait: ``True`` if done.

        ``False``: a parent is missing (or a v1 cpuset parent is not filled yet, or v2
        controllers are to be enabled), nothing is left made; :meth:`prepare_locked` does it.
        Bounded work (a few ``mkdir`` and writes), so a start runs it on its event loop.
        """
        return creation.prepare_lock_free(self)

    def prepare_locked(self) -> None:
        """:meth:`prepare` after :meth:`prepare_lock_free` said ``False``: under the host lock
        (it may wait for another process: run it in a thread)."""
        creation.prepare(self, lock_free_tried=True)

    def remove_lock_free(self) -> bool:
        """:meth:`remove` if it needs neither the host lock nor a drain: ``True`` if done.

        The VM's own directories go (each an ``rmdir``); if one is busy, or a parent may have
        become empty, ``False``: :meth:`remove` (in a thread) does the rest.
        """
        return removal.remove_lock_free(self)

    def _write_setting(self, s: CgroupSetting) -> None:
        self._write(self._paths[self._key(s.controller)] / s.file, s.value, s.controller, "")

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
        keys = sorted({*self._paths} if everywhere else set(self.attach_keys))
        done: set[Path] = set()
        for key in keys:
            if self._paths[key] in done:
                continue
            done.add(self._paths[key])
            target = self._paths[key] / "cgroup.procs"
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

    def _remove_created(self, skip: Iterable[Path] = ()) -> tuple[list[str], set[Path]]:
        """Remove (deepest first) the directories this object created. Lock must be held.

        Returns the failures and the directories now gone."""
        return removal.remove_created(self, set(skip))

    def remove(self, timeout_s: float = 5.0) -> None:
        """Kill what is left in the VM's cgroups, wait, and remove the directories.

        Only directories this object created (recorded by :meth:`prepare`, kept in
        :meth:`to_dict`) are touched. Removes the VM directories, then, if a parent is left
        empty and is not a chain this process keeps (else no lock is taken: the chain stays
        until the process exits, see :mod:`.chains`), under the host lock the parent
        directories this object created, if empty and no live process keeps them; with the
        derived parent (``<own>/ironclaw``), that parent too if it is empty. Idempotent.
        Every step runs; failures are raised together as :class:`CleanupError`.
        """
        removal.remove(self, timeout_s)

    # ------------------------------------------------------------------ stats

    def stats(self) -> CgroupStats:
        return read_stats(self.fs, self.version, self._paths)

    def oom_kills(self) -> int | None:
        """OOM kills in the VM's memory cgroup (``None`` if the kernel does not say)."""
        cg = self._paths.get(self._key("memory"))
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
        parent = norm_parent(str(data["parent"]))
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


def jailer_managed(settings: Iterable[CgroupSetting]) -> set[str]:
    """Controllers whose VM cgroup the jailer creates and attaches the VMM to."""
    return {s.controller for s in via_jailer(list(settings))}


__all__ = ["UNIFIED", "VmCgroups", "jailer_managed", "sweep_intermediates"]
