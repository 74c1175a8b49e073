"""Every host resource a test may leave behind: used by the integration fixtures to prove cleanup.

:func:`leftovers` reports each resource of the kinds the orchestrator creates whose name
carries ``fragment`` (a VM id, an id prefix, a private directory's name), so concurrent runs
by other people, with other ids, never collide:

- processes: the jailer, the VMM under its resolved exec name (``firecracker-vX``; the comm
  is truncated to 15 bytes), supervisors, host and guest agents (python ``-m`` modules and
  console scripts of this package), by name and argv; any process rooted in or working in a
  matching jail (by inode: a jailed VMM's root link reads ``/``), any process inside a
  matching VM cgroup, and any of ``pids`` the caller names;
- jail directories (and half-made ``.claim-<id>-*`` ones) under every exec-name directory of
  every chroot base in use (the ones given, the default, and those registry records name);
- cgroup directories at any depth in every mounted hierarchy (each v1 controller, named v1
  hierarchies and the v2 mount), as ``/proc/self/mountinfo`` lists them; and parent chains
  (intermediate cgroup directories) listed in a cgroup ledger whose maker has exited (a live
  process's chain is kept by design: not a leak; without a fragment, and in ledgers given);
- network namespaces: ``/run/netns`` entries and nsfs bind mounts anywhere;
- TAPs and veths in this (the host's) network namespace, by the names derived from each id;
- run directories, registry records (and their temp, log and quarantine files), bound Unix
  sockets (``/proc/net/unix``, which also lists sockets whose file is already unlinked).

Every name comes from the project's one home (:mod:`ironclaw_orchestrator.names`,
:mod:`ironclaw_orchestrator.paths`), never re-derived here. The checker only reads.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

from ironclaw_orchestrator import names, procfs
from ironclaw_orchestrator.detach import CONFIG_PREFIX, SPAWN_LOG_PREFIX
from ironclaw_orchestrator.paths import default_run_dir, default_state_dir
from ironclaw_orchestrator.registry import LOCK_NAME, LOG_SUFFIX, RECORD_SUFFIX
from ironclaw_orchestrator.vm.cgroups import DEFAULT_LOCK_PATH, ledger

DEFAULT_CHROOT_BASE = Path("/var/jail")
NETNS_DIR = Path("/run/netns")
SYS_NET = Path("/sys/class/net")
MOUNTINFO = Path("/proc/self/mountinfo")
PROC_NET_UNIX = Path("/proc/net/unix")
#: The package's own processes carry one of these in their argv (``python -m <module>``).
PACKAGE = "ironclaw_orchestrator"
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass
class Scope:
    """Where to look, and what counts as ours. Roots are injectable for unit tests."""

    fragment: str = ""
    chroot_bases: tuple[Path, ...] = (DEFAULT_CHROOT_BASE,)
    run_roots: tuple[Path, ...] = ()
    state_dirs: tuple[Path, ...] = ()
    #: Exact VM ids (besides ``fragment`` itself) whose derived link names to look for.
    vm_ids: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    #: ``None``: every cgroup / cgroup2 mount of this host.
    cgroup_mounts: tuple[Path, ...] | None = None
    netns_dir: Path = NETNS_DIR
    sys_net: Path = SYS_NET
    mountinfo: Path = MOUNTINFO
    proc_net_unix: Path = PROC_NET_UNIX
    #: Cgroup host locks whose ledgers' chains of exited makers count as leftovers.
    cgroup_lock_paths: tuple[Path, ...] = ()
    #: Ids met on the way (jail dirs, records, ...): their TAP/veth names are checked too.
    seen_ids: set[str] = field(default_factory=set)

    def matches(self, name: str) -> bool:
        return self.fragment in name


def leftovers(
    fragment: str = "",
    chroot_bases: Iterable[Path] = (DEFAULT_CHROOT_BASE,),
    *,
    run_roots: Iterable[Path] = (),
    state_dirs: Iterable[Path] = (),
    vm_ids: Iterable[str] = (),
    pids: Iterable[int] = (),
    cgroup_mounts: Iterable[Path] | None = None,
    netns_dir: Path = NETNS_DIR,
    sys_net: Path = SYS_NET,
    mountinfo: Path = MOUNTINFO,
    proc_net_unix: Path = PROC_NET_UNIX,
    cgroup_lock_paths: Iterable[Path] = (),
) -> list[str]:
    """Every resource of ours on this host whose name contains ``fragment`` (all, if empty).

    The default run dir, state dir and chroot base are always looked at, besides the ones
    given. Each entry reads ``"<kind> <what>"``.
    """
    scope = Scope(
        fragment=fragment,
        chroot_bases=_unique([*chroot_bases, DEFAULT_CHROOT_BASE]),
        run_roots=_unique([*run_roots, default_run_dir(create=False)]),
        state_dirs=_unique([*state_dirs, default_state_dir(create=False)]),
        vm_ids=tuple(vm_ids),
        pids=tuple(pids),
        cgroup_mounts=None if cgroup_mounts is None else tuple(cgroup_mounts),
        netns_dir=netns_dir,
        sys_net=sys_net,
        mountinfo=mountinfo,
        proc_net_unix=proc_net_unix,
        cgroup_lock_paths=_unique([*cgroup_lock_paths, *([] if fragment else [DEFAULT_LOCK_PATH])]),
    )
    found = registry_entries(scope)  # first: records name jail dirs outside the given bases
    jails = jail_dirs(scope)
    found += [f"jail dir {j}" for j in jails]
    found += processes(scope, jails)
    found += run_dirs(scope)
    found += cgroup_dirs(scope)
    found += cgroup_chains(scope)
    found += network_namespaces(scope)
    found += host_links(scope)
    found += unix_sockets(scope)
    return found


def _unique(paths: Iterable[Path]) -> tuple[Path, ...]:
    return tuple(dict.fromkeys(Path(p) for p in paths))


def _note_id(scope: Scope, candidate: str) -> None:
    if names.is_valid_id(candidate):
        scope.seen_ids.add(candidate)


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


# --------------------------------------------------------------------------- registry, run dirs


def registry_entries(scope: Scope) -> list[str]:
    """Records ``<id>.json`` and their ``.<id>.json.*.tmp``, ``<id>.log``, ``.corrupt-*``
    files, and a detached start's hand-over files (``.config-*``: by the id inside;
    ``.spawn-*``: only without a fragment). A record's jail dir adds its chroot base to the
    ones searched."""
    found = []
    for state in scope.state_dirs:
        for name in _listdir(state):
            path = state / name
            if name == LOCK_NAME:
                continue
            if name.startswith(CONFIG_PREFIX):
                ours = scope.matches(str(_json(path).get("vm_id", "")))
            elif name.startswith(SPAWN_LOG_PREFIX):
                ours = not scope.fragment
            else:
                ours = scope.matches(name)
                if ours:
                    _note_id(scope, name.split(RECORD_SUFFIX)[0].split(LOG_SUFFIX)[0])
                jail = _json(path).get("jail_dir") if name.endswith(RECORD_SUFFIX) else None
                if ours and isinstance(jail, str) and jail:
                    base = Path(jail).parent.parent  # <base>/<exec name>/<id>
                    scope.chroot_bases = _unique([*scope.chroot_bases, base])
            if ours:
                found.append(f"registry record {path}")
    return found


def _json(path: Path) -> dict[str, object]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    return {}


def run_dirs(scope: Scope) -> list[str]:
    found = []
    for root in scope.run_roots:
        vms = root / names.VMS_DIR
        for name in _listdir(vms):
            if scope.matches(name):
                found.append(f"run dir {vms / name}")
                _note_id(scope, name)
    return found


# --------------------------------------------------------------------------- jails, processes


def jail_dirs(scope: Scope) -> list[Path]:
    """``<base>/<exec name>/<id>`` (and ``.claim-<id>-*``) under every exec-name directory."""
    found = []
    for base in scope.chroot_bases:
        for exec_name in _listdir(base):
            exec_dir = base / exec_name
            if not exec_dir.is_dir() or exec_dir.is_symlink():
                continue
            for name in _listdir(exec_dir):
                if scope.matches(name):
                    found.append(exec_dir / name)
                    _note_id(scope, name)
    return found


@cache
def vmm_exec_names() -> frozenset[str]:
    """Names a VMM of this host may carry: the resolved exec file's, plus ``firecracker``."""
    found = {"firecracker"}
    with contextlib.suppress(Exception):  # no binary here: nothing of ours runs either
        from ironclaw_orchestrator.vm.binaries import find_firecracker

        found.add(names.exec_file_name(find_firecracker()))
    return frozenset(found)


@cache
def console_scripts() -> frozenset[str]:
    """This package's console scripts (``ironclaw``, ``ironclaw-agent``), from its metadata."""
    with contextlib.suppress(metadata.PackageNotFoundError):
        dist = metadata.distribution("ironclaw-orchestrator")
        return frozenset(e.name for e in dist.entry_points if e.group == "console_scripts")
    return frozenset({"ironclaw"})


def is_ours(comm: str, cmdline: list[str]) -> bool:
    """A jailer, a VMM, or one of this package's programs (supervisor, agents, the CLI)."""
    vmm_comms = {names.process_name(n) for n in vmm_exec_names()}
    if comm == "jailer" or comm in vmm_comms:
        return True
    head = [os.path.basename(a) for a in cmdline[:3]]
    if any(h in console_scripts() or h == "jailer" or h in vmm_exec_names() for h in head):
        return True
    return any(a == PACKAGE or a.startswith(PACKAGE + ".") for a in cmdline)


def processes(scope: Scope, jails: list[Path]) -> list[str]:
    """Ours by name and argv, rooted in a matching jail, inside a matching VM cgroup, or
    named by pid."""
    me = os.getpid()
    in_jail = {pid for jail in jails for pid in procfs.pids_using_dir(jail, fds=False)}
    found = []
    for pid in procfs.all_pids():
        if pid == me:
            continue
        st = procfs.read_stat(pid)
        if st is None:
            continue
        cmd = procfs.read_cmdline(pid)
        why = None
        if pid in scope.pids:
            why = "named by the test"
        elif pid in in_jail:
            why = "rooted in a jail"
        elif is_ours(st.comm, cmd) and scope.matches(" ".join(cmd)):
            why = "by name"
        elif scope.fragment and _in_vm_cgroup(pid, scope.fragment):
            why = "in a VM cgroup"
        if why:
            found.append(f"process {pid} ({st.comm}, state {st.state}, {why}): {' '.join(cmd)}")
    return found


def _in_vm_cgroup(pid: int, fragment: str) -> bool:
    for path in procfs.cgroup_paths(pid):
        parts = path.strip("/").split("/")
        if any(
            a == names.PARENT_CGROUP_NAME and fragment in b for a, b in itertools.pairwise(parts)
        ):
            return True
    return False


# --------------------------------------------------------------------------- cgroups


def _mounts(mountinfo: Path) -> Iterator[tuple[str, Path]]:
    """``(fstype, mount point)`` of each line of mountinfo."""
    with contextlib.suppress(OSError):
        for line in mountinfo.read_text().splitlines():
            fields = line.split()
            if "-" not in fields:
                continue
            sep = fields.index("-")
            point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
            yield fields[sep + 1], Path(point)


def cgroup_mounts(mountinfo: Path = MOUNTINFO) -> tuple[Path, ...]:
    """Every v1 hierarchy (controllers and named) and the v2 mount, once each."""
    return _unique(p for fstype, p in _mounts(mountinfo) if fstype in ("cgroup", "cgroup2"))


def cgroup_dirs(scope: Scope) -> list[str]:
    """With a fragment: every cgroup directory, at any depth, whose name contains it.
    Without: every directory beneath a ``ironclaw`` parent (the parent itself is shared)."""
    mounts = cgroup_mounts(scope.mountinfo) if scope.cgroup_mounts is None else scope.cgroup_mounts
    found = []
    for mount in mounts:
        for dirpath, dirnames, _files in os.walk(mount):
            here = Path(dirpath)
            for d in dirnames:
                ours = (
                    scope.matches(d)
                    if scope.fragment
                    else (names.PARENT_CGROUP_NAME in here.relative_to(mount).parts)
                )
                if ours:
                    found.append(f"cgroup {here / d}")
                    _note_id(scope, d)
    return found


def cgroup_chains(scope: Scope) -> list[str]:
    """Listed intermediate cgroup directories that exist although their maker has exited
    (a crash: ``gc`` removes them) or that nobody owns (older releases)."""
    found = []
    for lock_path in scope.cgroup_lock_paths:
        listed = ledger.listing(lock_path)
        for where, owner in sorted(listed.items()):
            if os.path.isdir(where) and not ledger.owner_alive(owner):
                maker = f"made by {owner}, which has exited" if owner else "no maker recorded"
                found.append(f"parent cgroup chain {where} ({maker})")
    return found


# --------------------------------------------------------------------------- network


def network_namespaces(scope: Scope) -> list[str]:
    """Named namespaces (``/run/netns/<name>``, a bind mount or a stale file) and nsfs bind
    mounts anywhere else."""
    found = {}
    for name in _listdir(scope.netns_dir):
        ours = scope.matches(name) if scope.fragment else name.startswith(names.NETNS_PREFIX)
        if ours:
            found[scope.netns_dir / name] = f"netns {scope.netns_dir / name}"
            vm_id = names.id_from_netns(name)
            if vm_id is not None:
                _note_id(scope, vm_id)
    for fstype, point in _mounts(scope.mountinfo):
        if fstype != "nsfs" or point in found:
            continue
        if scope.matches(str(point)) if scope.fragment else point.parent == scope.netns_dir:
            found[point] = f"netns bind mount {point}"
    return list(found.values())


def _link_prefixes() -> tuple[str, ...]:
    """The prefixes of derived link names, from the functions that derive them."""
    host, peer = names.uplink_names("x")
    return tuple(n[:3] for n in (names.tap_name("x"), host, peer))


def host_links(scope: Scope) -> list[str]:
    """TAPs and veths in this network namespace named after a known id (or, without a
    fragment, any link with a derived name's prefix)."""
    present = set(_listdir(scope.sys_net))
    found = []
    if not scope.fragment:
        prefixes = _link_prefixes()
        return [f"link {n}" for n in sorted(present) if n.startswith(prefixes)]
    ids = {i for i in (scope.fragment, *scope.vm_ids, *scope.seen_ids) if names.is_valid_id(i)}
    for vm_id in sorted(ids):
        host, peer = names.uplink_names(vm_id)
        for kind, name in (("tap", names.tap_name(vm_id)), ("veth", host), ("veth peer", peer)):
            if name in present:
                found.append(f"{kind} {name} (of {vm_id})")
    return found


def unix_sockets(scope: Scope) -> list[str]:
    """Bound Unix sockets whose path contains the fragment (open somewhere, even if the file
    is gone); without a fragment, those under a chroot base or run root."""
    roots = tuple(str(p).rstrip("/") + "/" for p in (*scope.chroot_bases, *scope.run_roots))
    found = set()
    with contextlib.suppress(OSError):
        for line in scope.proc_net_unix.read_text().splitlines()[1:]:
            fields = line.split(maxsplit=7)
            if len(fields) < 8 or not fields[7].startswith("/"):
                continue
            path = fields[7]
            if (scope.fragment and scope.matches(path)) or (
                not scope.fragment and path.startswith(roots)
            ):
                found.add(f"socket {path}")
    return sorted(found)
