"""``ironclaw doctor``: can this host run jailed microVMs? (library half; never prints).

:func:`run_checks` returns a :class:`DoctorReport`: one :class:`Check` per question, each with
a status (``pass`` / ``warn`` / ``fail``), the value found and a one-line fix. The host is
ready (:attr:`DoctorReport.ok`) when no check failed; warnings are things that only some VMs
need (optional cgroup controllers, ids longer than the socket budget allows, ...).

Static checks only read the host, except two probes that are undone at once: a uniquely named
``ironclaw-doctor-<random>`` directory is created and removed under the orchestrator's own
cgroup of each controller, and a temporary directory under the chroot base. Nothing else is
written; in particular no network namespace is created.

With ``live=True`` the built-in probe guest (:mod:`.vm.probe`) is booted jailed, exactly as
``start_firecracker`` boots a VM, and timed; ``live_unjailed=True`` also boots it without the
jailer (development mode). Every live VM is stopped and cleaned up, also when a step fails.

Every host path is injectable through :class:`HostPaths`, so tests can point the checks at
fake trees.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from .errors import IronclawError, VersionMismatchError
from .names import exec_file_name
from .vm.binaries import check_pair, find_firecracker, find_jailer, read_version
from .vm.cgroups import CgroupLayout, choose_version, detect_layout
from .vm.config import MAX_SOCKET_PATH_BYTES, JailerConfig, VmConfig
from .vm.hostcheck import MountInfo, mount_of

__all__ = [
    "CGROUP_CONTROLLERS",
    "DOCTOR_ID_PREFIX",
    "Check",
    "DoctorReport",
    "HostPaths",
    "Status",
    "run_checks",
    "run_live_check",
    "run_static_checks",
]

#: Every name this module creates (cgroup probes, live VM ids) starts with this.
DOCTOR_ID_PREFIX = "ironclaw-doctor-"
#: Controllers a VM may use; ``cpu`` and ``memory`` are always used (limits), the others
#: only for optional limits (``cpuset_cpus``, ``pids_max``, ``io_*``).
CGROUP_CONTROLLERS = ("cpu", "memory", "cpuset", "pids", "io")
REQUIRED_CONTROLLERS = frozenset({"cpu", "memory"})
#: Longest id the jailer accepts (and the one the socket budget is checked with).
MAX_ID_LENGTH = 64
#: Deadline for each live-boot step (spawn, guest ready line, guest exit).
LIVE_STEP_TIMEOUT_S = 20.0

_V1_NAME = {"io": "blkio"}
_CHROOT_FIX = "sudo mkdir -p {base} && sudo chmod 755 {base} && sudo chown root:root {base}"
_INSTALL_FIX = (
    "run `ironclaw install` (or copy jailer and firecracker-vX.Y.Z from one release archive "
    "to /usr/local/bin, chmod +x), or set IRONCLAW_FIRECRACKER / IRONCLAW_JAILER"
)


class Status(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """The answer to one question about the host."""

    name: str
    status: Status
    #: What was found (a path, a version, a mode, a measurement).
    value: str
    #: One line saying how to fix it; empty when the check passed.
    fix: str = ""
    #: Machine-readable extras (e.g. live-boot timings in milliseconds).
    details: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status.value,
            "value": self.value,
            "fix": self.fix,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class DoctorReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        """``True`` when nothing failed: the host can run jailed VMs."""
        return not any(c.status is Status.FAIL for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status is Status.FAIL]

    def get(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)

    def counts(self) -> dict[str, int]:
        return {s.value: sum(c.status is s for c in self.checks) for s in Status}

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready document holding every check."""
        return {
            "ok": self.ok,
            "summary": self.counts(),
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True)
class HostPaths:
    """Where the checks look; the defaults are the real host's."""

    kvm: Path = Path("/dev/kvm")
    #: ``/proc``: ``self/mountinfo``, ``self/cgroup``, ``self/ns/net`` are read below it.
    proc: Path = Path("/proc")
    netns_dir: Path = Path("/run/netns")
    tun: Path = Path("/dev/net/tun")
    geteuid: Callable[[], int] = os.geteuid

    @property
    def mountinfo(self) -> Path:
        return self.proc / "self" / "mountinfo"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------- checks


def check_root(host: HostPaths) -> Check:
    uid = host.geteuid()
    if uid == 0:
        return Check("root", Status.PASS, "running as root (uid 0)")
    return Check(
        "root",
        Status.FAIL,
        f"running as uid {uid}",
        "the jailer must be started by root: run ironclaw as root (sudo)",
    )


def check_kvm_device(host: HostPaths) -> Check:
    path = host.kvm
    if not path.exists():
        return Check(
            "kvm",
            Status.FAIL,
            f"{path} does not exist",
            "enable virtualization in firmware and load kvm_intel/kvm_amd (modprobe kvm_intel), "
            "or use a host with nested virtualization",
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Check(
            "kvm",
            Status.FAIL,
            f"{path} cannot be opened read-write: {exc.strerror}",
            "run as root or grant access (setfacl -m u:$USER:rw /dev/kvm)",
        )
    os.close(fd)
    return Check("kvm", Status.PASS, f"{path} is readable and writable")


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
            version = read_version(path)
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
                f"jailer {read_version(found['jailer'])} != firecracker "
                f"{read_version(found['firecracker'])}",
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
    name = "chroot base"
    fix = _CHROOT_FIX.format(base=base)
    if not base.exists():
        return Check(name, Status.FAIL, f"{base} does not exist", fix)
    if not base.is_dir():
        return Check(name, Status.FAIL, f"{base} is not a directory", f"remove it, then {fix}")
    try:
        probe = tempfile.mkdtemp(prefix=f".{DOCTOR_ID_PREFIX}", dir=base)
    except OSError as exc:
        return Check(name, Status.FAIL, f"{base} is not writable: {exc.strerror}", fix)
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    try:
        mount: MountInfo | None = mount_of(base, host.mountinfo)
    except OSError:
        mount = None
    if mount is None:
        return Check(name, Status.WARN, f"{base}: mount not found in {host.mountinfo}",
                     "check that it is not mounted noexec/nodev")  # fmt: skip
    bad = sorted(mount.options & {"noexec", "nodev"})
    where = f"{base} on {mount.mount_point} ({mount.fs_type}, {','.join(sorted(mount.options))})"
    if bad:
        return Check(
            name, Status.FAIL, f"{where}: mounted {','.join(bad)}",
            f"remount (mount -o remount,exec,dev {mount.mount_point}) or pick another "
            "chroot_base_dir on a disk-backed filesystem",
        )  # fmt: skip
    if mount.fs_type == "tmpfs":
        return Check(
            name, Status.WARN, f"{where}: tmpfs",
            "use a disk-backed directory: staged disks would use RAM and tmpfs mounts are "
            "often nodev after a reboot",
        )  # fmt: skip
    return Check(name, Status.PASS, where)


def check_socket_budget_for(config: JailerConfig, exec_name: str) -> Check:
    name = "socket path budget"
    probe = config.model_copy(
        update={"jailer_id": "x" * MAX_ID_LENGTH, "exec_file": Path("/") / exec_name}
    )
    size = len(str(probe.api_socket_path).encode())
    over = size - MAX_SOCKET_PATH_BYTES
    value = (
        f"{config.chroot_base_dir}/{exec_name}/<64-char id>/root{config.api_sock}: "
        f"{size} of {MAX_SOCKET_PATH_BYTES} bytes"
    )
    details: dict[str, object] = {"bytes": size, "limit": MAX_SOCKET_PATH_BYTES}
    if over <= 0:
        return Check(name, Status.PASS, value, details=details)
    longest = MAX_ID_LENGTH - over
    details["max_id_length"] = max(longest, 0)
    fix = (
        f"keep VM ids to {max(longest, 0)} characters, or shorten chroot_base_dir or the exec "
        "file name"
    )
    if longest >= 1:
        return Check(name, Status.WARN, f"{value}; ids up to {longest} characters fit", fix,
                     details)  # fmt: skip
    return Check(name, Status.FAIL, f"{value}; not even a 1-character id fits", fix, details)


def check_netns(config: JailerConfig, host: HostPaths) -> list[Check]:
    name = "network namespaces"
    needed = config.netns is None and config.isolate_network
    bad = Status.FAIL if needed else Status.WARN
    ns_file = host.proc / "self" / "ns" / "net"
    checks: list[Check] = []
    if not ns_file.exists():
        checks.append(Check(name, bad, f"{ns_file} missing: no network namespace support",
                            "use a kernel with CONFIG_NET_NS=y"))  # fmt: skip
    else:
        directory = host.netns_dir
        if directory.is_dir():
            ok = os.access(directory, os.W_OK | os.X_OK)
            value = f"{directory} is {'writable' if ok else 'not writable'}"
        else:
            parent = directory.parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent
            ok = os.access(parent, os.W_OK | os.X_OK)
            value = f"{directory} missing; {'can' if ok else 'cannot'} be created under {parent}"
        if ok:
            checks.append(Check(name, Status.PASS, f"supported; {value}"))
        else:
            checks.append(Check(name, bad, value, f"run as root so {directory} can be written"))
    if host.tun.exists():
        checks.append(Check("tun device", Status.PASS, f"{host.tun} exists"))
    else:
        checks.append(Check("tun device", Status.WARN, f"{host.tun} missing (needed only for "
                            "enable_networking)", "modprobe tun"))  # fmt: skip
    return checks


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
    return checks


# --------------------------------------------------------------------------- live boot


def _live_vm_config(config: JailerConfig, kernel: Path, vm_id: str, jailed: bool) -> VmConfig:
    from .vm.probe import PROBE_BOOT_ARGS

    # Keep the user's jail settings, but let the VM derive id, vCPUs and memory limit.
    chosen = config.model_dump(
        exclude_unset=True, exclude={"jailer_id", "cpu_count", "memory_limit_mb"}
    )
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(kernel),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        require_sandbox=jailed,
        jailer=JailerConfig(**chosen),
    )


async def _wait_for_line(path: Path, line: str, timeout_s: float) -> None:
    needle = line.encode()
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            if needle in path.read_bytes():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {line!r} on the console within {timeout_s:.0f} s")
        await asyncio.sleep(0.005)


async def run_live_check(config: JailerConfig | None = None, *, jailed: bool = True) -> Check:
    """Boot the probe guest (reset behaviour) and time it; always stopped and cleaned up."""
    from .vm import FirecrackerProcess, start_firecracker
    from .vm.probe import READY_LINE, ProbeBehaviour, probe_kernel_path

    config = config or JailerConfig()
    name = "live boot (jailed)" if jailed else "live boot (unjailed)"
    vm_id = f"{DOCTOR_ID_PREFIX}{secrets.token_hex(3)}"
    timings: dict[str, object] = {"vm_id": vm_id}
    vm: FirecrackerProcess | None = None
    step = "building the probe kernel"
    try:
        kernel = await asyncio.to_thread(probe_kernel_path, ProbeBehaviour.RESET)
        cfg = _live_vm_config(config, kernel, vm_id, jailed)
        step = "spawning the VMM"
        t0 = time.monotonic()
        vm = await start_firecracker(cfg, use_jailer=jailed, ready_timeout_s=LIVE_STEP_TIMEOUT_S)
        t1 = time.monotonic()
        timings["spawn_to_api_ready_ms"] = round((t1 - t0) * 1000, 1)
        timings["sandboxed"] = vm.is_sandboxed
        step = "booting the guest"
        await vm.start_instance()
        await _wait_for_line(vm.console_path, READY_LINE, LIVE_STEP_TIMEOUT_S)
        t2 = time.monotonic()
        timings["start_to_ready_line_ms"] = round((t2 - t1) * 1000, 1)
        step = "waiting for the guest to exit"
        code = await asyncio.wait_for(vm.wait(), LIVE_STEP_TIMEOUT_S)
        t3 = time.monotonic()
        timings["ready_to_exit_ms"] = round((t3 - t2) * 1000, 1)
        timings["exit_code"] = code
        step = "stopping and cleaning up"
        await vm.stop()
        vm = None
        timings["stop_cleanup_ms"] = round((time.monotonic() - t3) * 1000, 1)
        if code != 0:
            raise RuntimeError(f"the VMM exited with status {code} instead of 0")
    except (IronclawError, TimeoutError, RuntimeError, OSError) as exc:
        return Check(
            name, Status.FAIL, f"failed while {step}: {_first_line(exc)}",
            _live_fix(exc), details={**timings, "error": str(exc)},
        )  # fmt: skip
    finally:
        if vm is not None:
            with contextlib.suppress(Exception):
                await vm.stop()
    value = (
        f"spawn->API {timings['spawn_to_api_ready_ms']} ms, start->ready "
        f"{timings['start_to_ready_line_ms']} ms, ->exit {timings['ready_to_exit_ms']} ms, "
        f"stop+cleanup {timings['stop_cleanup_ms']} ms"
    )
    return Check(name, Status.PASS, value, details=timings)


def _live_fix(exc: BaseException) -> str:
    from .errors import (
        ApiSocketTimeoutError,
        CgroupError,
        ChrootBaseError,
        HostError,
        OutOfMemoryError,
        VmExitedError,
    )

    if isinstance(exc, ChrootBaseError):
        return "fix the chroot base (see the 'chroot base' check)"
    if isinstance(exc, CgroupError):
        return "fix the cgroup checks above (controllers / delegation)"
    if isinstance(exc, HostError):
        return "fix the failed checks above first"
    if isinstance(exc, OutOfMemoryError):
        return "raise jailer.memory_limit_mb (guest memory + VMM overhead + headroom)"
    if isinstance(exc, VmExitedError):
        return "the VM exited immediately: check the console output in the error and the limits"
    if isinstance(exc, ApiSocketTimeoutError):
        return "the API socket was not created: check the jailer output and the socket budget"
    return "re-run with -v for debug logging and check the error above"


async def run_checks(
    config: JailerConfig | None = None,
    *,
    live: bool = False,
    live_unjailed: bool = False,
    host: HostPaths | None = None,
) -> DoctorReport:
    """Run every static check, then (if asked) the live boot(s); never raises for a
    host problem, which becomes a failed :class:`Check` instead."""
    config = config or JailerConfig()
    checks = await asyncio.to_thread(run_static_checks, config, host=host)
    if live:
        checks.append(await run_live_check(config, jailed=True))
    if live_unjailed:
        checks.append(await run_live_check(config, jailed=False))
    return DoctorReport(checks)
