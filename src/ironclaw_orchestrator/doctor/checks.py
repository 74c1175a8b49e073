"""The static checks of ``ironclaw doctor``: every question answered without booting a VM.

Host checks that the launch path also makes live in :mod:`ironclaw_orchestrator.vm.hostcheck`
and are only turned into :class:`~.report.Check` s here; the binaries are judged by
:mod:`ironclaw_orchestrator.vm.binaries`. The cgroup checks probe by creating and removing
a uniquely named ``ironclaw-doctor-<random>`` directory under the orchestrator's own cgroup
of each controller.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import IronclawError, VersionMismatchError
from ..lsm import LsmPaths
from ..names import exec_file_name
from ..vm.binaries import check_pair, find_firecracker, find_jailer, read_version
from ..vm.cgroups import CgroupLayout, choose_version, detect_layout
from ..vm.config import JailerConfig
from ..vm.hostcheck import (
    KVM_PATH,
    inspect_chroot_base,
    inspect_kvm,
    inspect_netns_support,
    inspect_root,
    inspect_socket_budget,
    inspect_tun,
)
from ..vm.netns import NETNS_DIR, TUN_DEVICE
from .confinement import check_confinement
from .report import DOCTOR_ID_PREFIX, Check, Status, _first_line, check_from

#: Controllers a VM may use; ``cpu`` and ``memory`` are always used (limits), the others
#: only for optional limits (``cpuset_cpus``, ``pids_max``, ``io_*``).
CGROUP_CONTROLLERS = ("cpu", "memory", "cpuset", "pids", "io")
REQUIRED_CONTROLLERS = frozenset({"cpu", "memory"})

_V1_NAME = {"io": "blkio"}
_INSTALL_FIX = (
    "run `ironclaw install` (or copy jailer and firecracker-vX.Y.Z from one release archive "
    "to /usr/local/bin, chmod +x), or set IRONCLAW_FIRECRACKER / IRONCLAW_JAILER"
)


@dataclass(frozen=True)
class HostPaths:
    """Where the checks look; the defaults are the real host's."""

    kvm: Path = KVM_PATH
    #: ``/proc``: ``self/mountinfo``, ``self/cgroup``, ``self/ns/net`` are read below it.
    proc: Path = Path("/proc")
    netns_dir: Path = NETNS_DIR
    tun: Path = TUN_DEVICE
    geteuid: Callable[[], int] = os.geteuid
    lsm: LsmPaths = field(default_factory=LsmPaths)

    @property
    def mountinfo(self) -> Path:
        return self.proc / "self" / "mountinfo"


def check_root(host: HostPaths) -> Check:
    return check_from("root", inspect_root(host.geteuid))


def check_kvm_device(host: HostPaths) -> Check:
    return check_from("kvm", inspect_kvm(host.kvm))


def _explicit(config: JailerConfig, name: str) -> Path | None:
    value = getattr(config, name)
    return value if name in config.model_fields_set and isinstance(value, Path) else None


def check_binaries(config: JailerConfig) -> tuple[list[Check], Path | None]:
    """``firecracker``, ``jailer`` and ``versions`` checks, and the firecracker found."""
    checks: list[Check] = []
    found: dict[str, Path] = {}
    finders = (
        ("firecracker", find_firecracker, _explicit(config, "exec_file")),
        ("jailer", find_jailer, _explicit(config, "jailer_binary")),
    )
    for name, finder, explicit in finders:
        try:
            path = finder(explicit)
            version = read_version(path, name)
        except IronclawError as exc:
            checks.append(Check(name, Status.FAIL, _first_line(exc), _INSTALL_FIX))
            continue
        found[name] = path
        checks.append(Check(name, Status.PASS, f"{path} ({version})", details={
            "path": str(path), "version": str(version)}))  # fmt: skip
    if len(found) < 2:
        checks.append(
            Check("versions", Status.FAIL, "not compared: a binary is missing", _INSTALL_FIX)
        )
        return checks, found.get("firecracker")
    try:
        pair = check_pair(found["jailer"], found["firecracker"])
    except VersionMismatchError as exc:
        checks.append(
            Check(
                "versions",
                Status.FAIL,
                f"jailer {read_version(found['jailer'], 'jailer')} != firecracker "
                f"{read_version(found['firecracker'], 'firecracker')}",
                "install both from one release archive (`ironclaw install --version vX.Y.Z`)",
                details={"message": str(exc)},
            )
        )
    except IronclawError as exc:  # e.g. exec file name rejected by this jailer version
        checks.append(Check("versions", Status.FAIL, _first_line(exc), _INSTALL_FIX))
    else:
        checks.append(Check("versions", Status.PASS, f"both {pair.version}"))
    return checks, found["firecracker"]


def _own_dir(layout: CgroupLayout, mount: Path, controller_key: str, version: int) -> Path | None:
    own = layout.own_path(controller_key, 2 if version == 2 else 1)
    visible = layout.visible_path(mount, own)
    return None if visible is None else mount / visible


def _probe_mkdir(parent: Path) -> str | None:
    """Create and remove ``<parent>/ironclaw-doctor-<random>``; ``None`` or the problem."""
    probe = parent / f"{DOCTOR_ID_PREFIX}{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as exc:
        return f"mkdir {probe}: {errno.errorcode.get(exc.errno or 0, '?')} {exc.strerror}"
    try:
        probe.rmdir()
    except OSError as exc:
        return f"rmdir {probe}: {exc.strerror} (remove it by hand)"
    return None


def _procs(cgroup_dir: Path) -> list[str]:
    try:
        return (cgroup_dir / "cgroup.procs").read_text().split()
    except OSError:
        return []


def check_cgroups(config: JailerConfig, host: HostPaths) -> list[Check]:
    layout = detect_layout(host.proc)
    if layout.mode == "none":
        return [
            Check(
                "cgroup layout",
                Status.FAIL,
                "no cgroup hierarchy mounted",
                "mount cgroup2 at /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup)",
            )
        ]
    try:
        version = choose_version(layout, config.cgroup_version, REQUIRED_CONTROLLERS)
    except IronclawError as exc:
        version = config.cgroup_version or (2 if layout.mode == "v2" else 1)
        layout_check = Check(
            "cgroup layout", Status.FAIL, f"{layout.mode}; {_first_line(exc)}",
            "enable cgroups v2 (GRUB_CMDLINE_LINUX: systemd.unified_cgroup_hierarchy=1) or "
            "mount the v1 cpu and memory controllers",
        )  # fmt: skip
    else:
        layout_check = Check(
            "cgroup layout", Status.PASS, f"{layout.mode}; VMs use cgroup v{version}",
            details={"mode": layout.mode, "version": version},
        )  # fmt: skip
    checks = [layout_check]
    for ctrl in CGROUP_CONTROLLERS:
        checks.append(_check_controller(layout, version, ctrl, config))
    return checks


def _check_controller(layout: CgroupLayout, version: int, ctrl: str, config: JailerConfig) -> Check:
    name = f"cgroup {ctrl}"
    required = ctrl in REQUIRED_CONTROLLERS
    bad = Status.FAIL if required else Status.WARN
    need = "" if required else " (only needed for its optional limits)"
    if version == 2:
        mount = layout.unified_mount
        key = ""
        label = ctrl
        if mount is None or ctrl not in layout.unified_controllers:
            return Check(
                name, bad, f"{ctrl} not in the unified hierarchy's cgroup.controllers{need}",
                "enable cgroups v2 with all controllers (GRUB_CMDLINE_LINUX: "
                "systemd.unified_cgroup_hierarchy=1), or use cgroup_version=1",
            )  # fmt: skip
    else:
        label = _V1_NAME.get(ctrl, ctrl)
        key = label
        mount = layout.v1_mounts.get(label)
        if mount is None:
            return Check(
                name, bad, f"v1 controller {label} is not mounted{need}",
                f"mount -t cgroup -o {label} cgroup /sys/fs/cgroup/{label}",
            )  # fmt: skip
    own = _own_dir(layout, mount, key, version)
    if own is None:
        return Check(
            name, bad, f"own {label} cgroup is not visible under {mount}",
            "set JailerConfig.parent_cgroup to a delegated path relative to the mount",
        )  # fmt: skip
    problem = _probe_mkdir(own)
    if problem is not None:
        return Check(
            name, bad, f"cannot create VM cgroups under {own}: {problem}",
            "run as root, delegate the cgroup (systemd Delegate=yes), or set "
            "JailerConfig.parent_cgroup to a writable subtree",
        )  # fmt: skip
    if version == 2 and config.parent_cgroup is None and own != mount:
        enabled = set(_read(own / "cgroup.subtree_control").split())
        if ctrl not in enabled and _procs(own):
            return Check(
                name, bad,
                f"{own} holds processes and does not delegate {ctrl} (cgroup v2 "
                "no-internal-processes rule: enabling it would fail with EBUSY)",
                "run under systemd with Delegate=yes and set JailerConfig.parent_cgroup to a "
                "subtree without processes",
            )  # fmt: skip
    return Check(name, Status.PASS, f"usable; VM cgroups can be created under {own}")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def check_chroot_base_dir(base: Path, host: HostPaths) -> Check:
    """Exists, writable (probed with a directory created and removed), exec and dev allowed."""
    finding = inspect_chroot_base(
        base, mountinfo=host.mountinfo, write_probe_prefix=f".{DOCTOR_ID_PREFIX}"
    )
    return check_from("chroot base", finding)


def check_socket_budget_for(config: JailerConfig, exec_name: str) -> Check:
    return check_from("socket path budget", inspect_socket_budget(config, exec_name))


def check_netns(config: JailerConfig, host: HostPaths) -> list[Check]:
    needed = config.netns is None and config.isolate_network
    support = inspect_netns_support(proc=host.proc, netns_dir=host.netns_dir, needed=needed)
    return [
        check_from("network namespaces", support),
        check_from("tun device", inspect_tun(host.tun)),
    ]


def run_static_checks(
    config: JailerConfig | None = None, *, host: HostPaths | None = None
) -> list[Check]:
    """Every check that does not boot a VM (quick; writes only the undone probes)."""
    config = config or JailerConfig()
    host = host or HostPaths()
    checks = [check_root(host), check_kvm_device(host)]
    binary_checks, firecracker = check_binaries(config)
    checks += binary_checks
    try:
        checks += check_cgroups(config, host)
    except OSError as exc:  # unreadable /proc: report instead of crashing
        checks.append(Check("cgroup layout", Status.FAIL, f"cannot read cgroups: {exc}",
                            "run on Linux with /proc mounted"))  # fmt: skip
    checks.append(check_chroot_base_dir(config.chroot_base_dir, host))
    exec_name = exec_file_name(firecracker) if firecracker is not None else config.exec_file_name
    checks.append(check_socket_budget_for(config, exec_name))
    checks += check_netns(config, host)
    checks += check_confinement(host)
    if host.geteuid() != 0:  # say what works now, and what jailed mode would need
        from .modes import check_development_mode, check_jailed_mode

        checks += [check_development_mode(checks, host), check_jailed_mode(checks, host)]
    return checks
