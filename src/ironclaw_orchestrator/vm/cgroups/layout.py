"""Where the host's cgroup hierarchies are, and which version a VM should use.

Sources (all below an injectable ``proc`` root, so tests can use fake trees):

* ``<proc>/self/mountinfo``: ``cgroup`` mounts (v1; super options name the controllers) and the
  ``cgroup2`` mount (the unified hierarchy);
* ``<unified mount>/cgroup.controllers``: controllers available on the unified hierarchy
  (empty on a hybrid host whose controllers are all bound to v1);
* ``<proc>/self/cgroup``: the orchestrator's own cgroup per controller
  (``4:memory:/a/b``; ``0::/x`` for the unified hierarchy, stored under the key ``""``).
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ...errors import CgroupControllerUnavailableError, CgroupError

Mode = Literal["v1", "v2", "hybrid", "none"]
Version = Literal[1, 2]

#: v1 controller name -> v2 name, for controllers that differ.
_V1_TO_V2 = {"blkio": "io", "cpuacct": "cpu"}
_V2_TO_V1 = {"io": "blkio"}

#: Every controller a v1 ``cgroup`` mount can carry (other super options are flags).
V1_CONTROLLERS = frozenset(
    {
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "freezer",
        "net_cls",
        "net_prio",
        "blkio",
        "perf_event",
        "hugetlb",
        "pids",
        "rdma",
        "misc",
        "debug",
    }
)

_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class CgroupLayout:
    """The host's cgroup mounts and the orchestrator's own place in them."""

    mode: Mode
    #: v1 controller -> its mount point (first mount, as the jailer picks it).
    v1_mounts: dict[str, Path]
    unified_mount: Path | None
    unified_controllers: frozenset[str]
    #: controller -> own cgroup path (``""`` key: the unified hierarchy).
    own_paths: dict[str, str]
    #: mount point -> the hierarchy path it shows (mountinfo field 4; ``/`` on most hosts,
    #: a sub path inside containers without a cgroup namespace).
    mount_roots: dict[Path, str] = field(default_factory=dict)

    def mount_for(self, controller: str, version: Version) -> Path | None:
        if version == 2:
            return self.unified_mount
        return self.v1_mounts.get(controller)

    def own_path(self, controller: str, version: Version) -> str:
        key = "" if version == 2 else controller
        return self.own_paths.get(key, "/")

    def visible_path(self, mount: Path, cgroup_path: str) -> str | None:
        """``cgroup_path`` (as in /proc/self/cgroup) relative to ``mount``; ``None`` if the
        mount does not show it."""
        root = self.mount_roots.get(mount, "/").rstrip("/")
        path = "/" + cgroup_path.strip("/")
        if not root:
            return path.strip("/")
        if path == root:
            return ""
        if path.startswith(root + "/"):
            return path[len(root) + 1 :]
        return None


def _unescape(text: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(
    text: str,
) -> tuple[dict[str, Path], Path | None, dict[Path, str]]:
    """``(v1 controller -> mount, unified mount, mount -> root)`` from mountinfo text."""
    v1: dict[str, Path] = {}
    unified: Path | None = None
    roots: dict[Path, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or len(fields) < sep + 4:
            continue
        root, mount = _unescape(fields[3]), Path(_unescape(fields[4]))
        fstype, super_opts = fields[sep + 1], fields[sep + 3]
        if fstype == "cgroup2":
            if unified is None:
                unified = mount
                roots[mount] = root
        elif fstype == "cgroup":
            for opt in super_opts.split(","):
                if opt in V1_CONTROLLERS and opt not in v1:
                    v1[opt] = mount
                    roots.setdefault(mount, root)
    return v1, unified, roots


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """controller -> own path from /proc/<pid>/cgroup text (``""`` = unified)."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _hid, controllers, path = parts
        if controllers == "":
            own[""] = path
            continue
        for ctrl in controllers.split(","):
            if ctrl and not ctrl.startswith("name="):
                own[ctrl] = path
    return own


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


_PROC = Path("/proc")


class _MountTableWatch:
    """The mount-derived part of the layout, re-read only when the mount table changes.

    The kernel marks an open ``/proc/self/mountinfo`` with ``POLLPRI`` after any mount or
    unmount (proc(5)); reading it again through the same descriptor re-arms the check. So a
    start costs one non-blocking ``poll`` instead of parsing every mount of the host.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self._poll: select.poll | None = None
        self._value: tuple[dict[str, Path], Path | None, dict[Path, str], frozenset[str]] | None
        self._value = None
        self._key = b""
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> tuple[dict[str, Path], Path | None, dict[Path, str], frozenset[str]]:
        with self._lock:
            if self._pid != os.getpid():  # a forked child re-opens its own view
                self._reset()
            if self._value is not None and self._poll is not None and not self._poll.poll(0):
                return self._value
            if self._fd is None:
                self._fd = os.open(_PROC / "self" / "mountinfo", os.O_RDONLY | os.O_CLOEXEC)
                self._poll = select.poll()
                self._poll.register(self._fd, select.POLLPRI | select.POLLERR)
                self._pid = os.getpid()
            os.lseek(self._fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(self._fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
            # Every new network namespace is a mount (/run/netns/<name>), so the table changes
            # with each VM started here: re-parse only when a cgroup mount line changed.
            key = b"\n".join(line for line in data.splitlines() if b"cgroup" in line)
            if self._value is None or key != self._key:
                self._value = _from_mountinfo(data.decode("utf-8", "replace"))
                self._key = key
            return self._value

    def _reset(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._poll, self._value = None, None, None


_watch = _MountTableWatch()


def _from_mountinfo(
    text: str,
) -> tuple[dict[str, Path], Path | None, dict[Path, str], frozenset[str]]:
    v1, unified, roots = parse_mountinfo(text)
    controllers: frozenset[str] = frozenset()
    if unified is not None:
        controllers = frozenset(_read(unified / "cgroup.controllers").split())
    return v1, unified, roots, controllers


def _read_own() -> bytes:
    fd = os.open("/proc/self/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, 65536)]
        while chunks[-1]:
            chunks.append(os.read(fd, 65536))
    finally:
        os.close(fd)
    return b"".join(chunks)


#: The last layout built from the real /proc: (mount-derived part, own cgroups text, layout).
_last: tuple[object, bytes, CgroupLayout] | None = None


def detect_layout(proc: Path = _PROC) -> CgroupLayout:
    """Read the host's cgroup layout (see the module docstring for the sources).

    For the real ``/proc`` the mount-derived part is cached until the mount table changes;
    the process's own cgroups are read every time (a process can be moved), and the same
    layout object is returned while neither changed (treat it as read-only).
    """
    global _last
    if proc is _PROC or proc == _PROC:
        mounts = _watch.get()
        own_text = _read_own()
        last = _last
        if last is not None and last[0] is mounts and last[1] == own_text:
            return last[2]
        layout = _layout(*mounts, parse_proc_cgroup(own_text.decode("utf-8", "replace")))
        _last = (mounts, own_text, layout)
        return layout
    v1, unified, roots, controllers = _from_mountinfo(_read(proc / "self" / "mountinfo"))
    return _layout(
        v1, unified, roots, controllers, parse_proc_cgroup(_read(proc / "self" / "cgroup"))
    )


def _layout(
    v1: dict[str, Path],
    unified: Path | None,
    roots: dict[Path, str],
    controllers: frozenset[str],
    own: dict[str, str],
) -> CgroupLayout:
    mode: Mode
    if v1 and unified is not None:
        mode = "hybrid"
    elif v1:
        mode = "v1"
    elif unified is not None:
        mode = "v2"
    else:
        mode = "none"
    return CgroupLayout(
        mode=mode,
        v1_mounts=dict(v1),  # copies: the cached originals are shared
        unified_mount=unified,
        unified_controllers=controllers,
        own_paths=own,
        mount_roots=dict(roots),
    )


def controller_names(controllers: Iterable[str], version: Version) -> list[str]:
    """Controller names as the given version spells them (``blkio`` <-> ``io``), sorted,
    without duplicates; v2 has no separate ``cpuacct``."""
    table = _V1_TO_V2 if version == 2 else _V2_TO_V1
    return sorted({table.get(c, c) for c in controllers})


def missing_controllers(
    layout: CgroupLayout, version: Version, controllers: Iterable[str]
) -> list[str]:
    names = controller_names(controllers, version)
    if version == 2:
        if layout.unified_mount is None:
            return names
        return [c for c in names if c not in layout.unified_controllers]
    return [c for c in names if c not in layout.v1_mounts]


def unavailable_error(
    layout: CgroupLayout, version: Version, missing: list[str]
) -> CgroupControllerUnavailableError:
    first = missing[0]
    if version == 2:
        if layout.unified_mount is None:
            where = "no cgroup2 (unified) hierarchy is mounted"
            fix = "mount cgroup2, or use cgroup_version=1 if the host has v1 controllers"
            path = None
        else:
            cc = layout.unified_mount / "cgroup.controllers"
            have = " ".join(sorted(layout.unified_controllers)) or "(empty)"
            where = f"{cc} lists {have}"
            path = str(cc)
            if layout.mode == "hybrid":
                fix = (
                    "enable it: the host is on cgroup v1/hybrid (the controller is bound to a "
                    "v1 hierarchy), use cgroup_version=1 or boot with "
                    "systemd.unified_cgroup_hierarchy=1"
                )
            else:
                fix = "enable it in the kernel/boot configuration or drop the limit that needs it"
        return CgroupControllerUnavailableError(
            f"Controller {first} is unavailable (cgroup v2, needed: {', '.join(missing)}): "
            f"{where}; {fix}",
            controller=first,
            path=path,
        )
    mounted = ", ".join(sorted(layout.v1_mounts)) or "none"
    fix = (
        "use cgroup_version=2 (the host is on the unified hierarchy)"
        if layout.mode == "v2"
        else f"mount the v1 '{first}' controller (mount -t cgroup -o {first} cgroup "
        f"/sys/fs/cgroup/{first}) or drop the limit that needs it"
    )
    return CgroupControllerUnavailableError(
        f"Controller {first} is unavailable (cgroup v1, needed: {', '.join(missing)}; "
        f"mounted v1 controllers: {mounted}): {fix}",
        controller=first,
    )


def choose_version(
    layout: CgroupLayout, requested: Version | None, controllers: Iterable[str]
) -> Version:
    """The cgroup version for a VM needing ``controllers`` (either version's names).

    An explicit ``requested`` version is honoured (and its controllers checked); otherwise
    2 when the unified hierarchy offers every controller, else 1 when v1 is mounted.
    """
    wanted = list(controllers)
    if requested is not None:
        missing = missing_controllers(layout, requested, wanted)
        if missing:
            raise unavailable_error(layout, requested, missing)
        return requested
    if layout.unified_mount is not None and not missing_controllers(layout, 2, wanted):
        return 2
    if layout.v1_mounts:
        missing = missing_controllers(layout, 1, wanted)
        if missing:
            raise unavailable_error(layout, 1, missing)
        return 1
    if layout.unified_mount is not None:
        raise unavailable_error(layout, 2, missing_controllers(layout, 2, wanted))
    raise CgroupError(
        "no cgroup hierarchy is mounted (neither cgroup v1 controllers nor cgroup2 in "
        "/proc/self/mountinfo): mount cgroup2 at /sys/fs/cgroup, or run without resource limits"
    )


def is_ancestor_or_equal(ancestor: str, path: str) -> bool:
    # On strings (normalised like PurePosixPath would): pathlib's parents cost ~50x more.
    a = "/" + "/".join(part for part in ancestor.split("/") if part not in ("", "."))
    p = "/" + "/".join(part for part in path.split("/") if part not in ("", "."))
    return a == p or a == "/" or p.startswith(a + "/")
