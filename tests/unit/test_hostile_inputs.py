"""Hostile input is refused before anything is spawned or made, naming the key (issue 9, §3).

One table of cases, each run through one entry point: the library (``start_firecracker``),
a TOML file (``ironclaw vm run|start --config``) or the flags (``ironclaw vm run|start``), in
process with typer's CliRunner; a few more through a real ``ironclaw`` subprocess. Each case
asserts:

* the project's error (``ConfigError``), naming the key (``jailer.uid``, ``memory_mb``...);
* the exit code the README's exit-status table documents for bad configuration (2);
* nothing spawned: every way to start a process (``os.posix_spawn``, ``os.fork``,
  ``subprocess.Popen``, the detached supervisor) raises if called, and no child is left;
* nothing made: the registry claim (which precedes every host resource) raises if reached;
  nothing was made on the stand-in host (below), and no jail, run or state directory,
  netns, cgroup or process named after the case's unique id exists on this host.

Every case runs on the stand-in host (``standin_host.make_refusal_host``): its binaries,
chroot base, run and state directories, fake cgroups and network, also for the ``ironclaw``
subprocesses. No root needed; and should a refusal break (a code change, a mutant) while
the suite runs as root, the case fails on a sentinel or names what the stand-ins made, it
does not start a real VM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from standin_host import StandinHost, make_refusal_host
from typer.testing import CliRunner

from ironclaw_orchestrator.cli import app
from ironclaw_orchestrator.cli import detached as detached_cli
from ironclaw_orchestrator.cli.common import ExitCode, exit_code_for
from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import hostcheck, hostroutes, start_firecracker
from ironclaw_orchestrator.vm.config import VmConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers

README = Path(__file__).resolve().parents[2] / "README.md"
runner = CliRunner()

#: More than this host's RAM, but within the model's hard bound (refused by the host check).
HOST_MIB = hostcheck.host_memory_mib() or 64 << 10
PETABYTE_MIB = 1 << 30
#: A host route for the hermetic overlap case.
FAKE_ROUTES = [hostcheck.HostRoute(ipaddress.IPv4Network("10.77.0.0/16"), "eth9")]


def documented_exit_codes() -> dict[int, str]:
    """The README's exit-status table: ``{code: meaning}``."""
    text = README.read_text()
    section = text[text.index("Exit status (stable):") :]
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*(.+?)\s*\|$", section, flags=re.M)
    return {int(code): meaning for code, meaning in rows}


@dataclass(frozen=True)
class Case:
    """One hostile input. ``via``: lib | toml | flags | start-flags | start-toml."""

    name: str
    via: str
    key: str
    #: lib: VmConfig keyword overrides; toml: (top-level text, [jailer] text); flags: argv.
    data: Any = None
    env: dict[str, str] = field(default_factory=dict)
    #: Let the uplink route check see this fake host route (hermetic).
    fake_routes: bool = False
    needs_root: bool = False


def lib(name: str, key: str, env: dict[str, str] | None = None, **data: Any) -> Case:
    return Case(name, "lib", key, data, env or {})


def toml(name: str, key: str, top: str = "", jailer: str = "", start: bool = False) -> Case:
    return Case(name, "start-toml" if start else "toml", key, (top, jailer))


def flags(name: str, key: str, *argv: str, start: bool = False, **env: str) -> Case:
    return Case(name, "start-flags" if start else "flags", key, list(argv), env)


CASES: list[Case] = [
    # --- the id rule
    lib("id-trailing-newline", "vm_id", vm_id="web-1\n"),
    lib("id-empty", "vm_id", vm_id=""),
    lib("id-slash", "vm_id", vm_id="a/b"),
    lib("id-too-long", "vm_id", vm_id="a" * 65),
    lib("id-unicode", "vm_id", vm_id="wéb"),
    lib("jailer-id-newline", "jailer.jailer_id", jailer={"jailer_id": "x\n"}),
    # --- strict types: a boolean is not an integer, a string is not a number
    lib("vcpus-true", "vcpu_count", vcpu_count=True),
    lib("vcpus-string", "vcpu_count", vcpu_count="2"),
    lib("vcpus-float", "vcpu_count", vcpu_count=2.0),
    lib("vcpus-zero", "vcpu_count", vcpu_count=0),
    lib("vcpus-33", "vcpu_count", vcpu_count=33),
    lib("memory-true", "memory_mb", memory_mb=True),
    lib("networking-int", "enable_networking", enable_networking=1),
    lib("require-sandbox-string", "require_sandbox", require_sandbox="yes"),
    lib("rootfs-ro-int", "rootfs_read_only", rootfs_read_only=0),
    lib("vsock-cid-true", "vsock_guest_cid", vsock_guest_cid=True),
    lib("uid-true", "jailer.uid", jailer={"uid": True}),
    lib("uid-zero", "jailer.uid", jailer={"uid": 0}),
    lib("gid-string", "jailer.gid", jailer={"gid": "64000"}),
    lib("jailer-cpu-true", "jailer.cpu_count", jailer={"cpu_count": True}),
    lib("cpu-limit-true", "jailer.cpu_limit", jailer={"cpu_limit": True}),
    lib("new-pid-ns-int", "jailer.new_pid_ns", jailer={"new_pid_ns": 1}),
    lib("cgroup-version-true", "jailer.cgroup_version", jailer={"cgroup_version": True}),
    lib("cgroup-version-3", "jailer.cgroup_version", jailer={"cgroup_version": 3}),
    lib("jailer-not-a-table", "jailer", jailer="ironclaw"),
    lib("unknown-key", "bogus", bogus=1),
    # --- sizes
    lib("memory-petabyte", "memory_mb", memory_mb=PETABYTE_MIB),
    lib("memory-over-host-ram", "memory_mb", memory_mb=HOST_MIB + 1),
    lib("memory-below-min", "memory_mb", memory_mb=64),
    lib("headroom-huge", "memory_headroom_mb", memory_headroom_mb=1 << 30),
    lib("limit-huge", "jailer.memory_limit_mb", jailer={"memory_limit_mb": 1 << 40}),
    lib(
        "limit-below-guest",
        "jailer.memory_limit_mb",
        memory_mb=256,
        jailer={"memory_limit_mb": 200},
    ),
    lib("memory-high-huge", "jailer.memory_high_mb", jailer={"memory_high_mb": 1 << 40}),
    lib("no-file-huge", "jailer.no_file", jailer={"no_file": 10**12}),
    lib("pids-max-huge", "jailer.pids_max", jailer={"pids_max": 1 << 40}),
    lib("io-bps-u64-overflow", "jailer.io_read_bps", jailer={"io_read_bps": 1 << 64}),
    lib("fsize-u64-overflow", "jailer.fsize", jailer={"fsize": 1 << 64}),
    lib("vsock-cid-2", "vsock_guest_cid", vsock_guest_cid=2),
    # --- the kernel command line
    lib("boot-args-nul", "boot_args", boot_args="console=ttyS0\x00 init=/x"),
    lib("boot-args-escape", "boot_args", boot_args="a\x1b[2Jb"),
    lib("boot-args-newline", "boot_args", boot_args="a\nb"),
    lib("boot-args-tab", "boot_args", boot_args="a\tb"),
    lib("boot-args-non-ascii", "boot_args", boot_args="root=/dev/vdä"),
    lib("boot-args-too-long", "boot_args", boot_args="x" * 2049),
    # --- paths
    lib("kernel-empty", "kernel_path", kernel_path=""),
    lib("kernel-missing", "kernel_path", kernel_path="/nonexistent/vmlinux"),
    lib("kernel-directory", "kernel_path", kernel_path="{dir}"),
    lib("kernel-device", "kernel_path", kernel_path="/dev/zero"),
    lib("kernel-newline", "kernel_path", kernel_path="{kernel}\n"),
    lib("kernel-long-component", "kernel_path", kernel_path="/" + "k" * 300),
    lib(
        "kernel-symlink-to-shadow",
        "kernel_path",
        kernel_path="{shadow_link}",
        image_dirs=["{images}"],
    ),
    lib(
        "rootfs-symlink-outside-env-dirs",
        "rootfs_path",
        env={"IRONCLAW_IMAGE_DIRS": "{images}"},
        rootfs_path="{shadow_link}",
    ),
    lib("rootfs-fifo", "rootfs_path", rootfs_path="{fifo}"),
    lib("image-dirs-relative", "image_dirs", image_dirs=["images"]),
    lib("image-dirs-empty", "image_dirs", image_dirs=[]),
    lib("jailer-image-dirs-relative", "jailer.image_dirs", jailer={"image_dirs": ["x"]}),
    lib(
        "image-dirs-env-relative",
        "IRONCLAW_IMAGE_DIRS",
        env={"IRONCLAW_IMAGE_DIRS": "relative/dir"},
    ),
    lib("chroot-base-empty", "jailer.chroot_base_dir", jailer={"chroot_base_dir": ""}),
    lib("chroot-base-newline", "jailer.chroot_base_dir", jailer={"chroot_base_dir": "/var/j\n"}),
    lib("exec-file-control", "jailer.exec_file", jailer={"exec_file": "/usr/bin/fc\x07"}),
    lib("netns-relative", "jailer.netns", jailer={"netns": "run/netns/x"}),
    lib("netns-missing", "jailer.netns", jailer={"netns": "/run/netns/ironclaw-no-such"}),
    lib("netns-not-a-namespace", "jailer.netns", jailer={"netns": "/etc/hostname"}),
    lib("netns-mount-namespace", "jailer.netns", jailer={"netns": "/proc/self/ns/mnt"}),
    lib("netns-name-too-long", "jailer.netns", jailer={"netns": "/run/netns/" + "n" * 300}),
    lib("netns-control", "jailer.netns", jailer={"netns": "/run/netns/x\r"}),
    lib("api-sock-relative", "jailer.api_sock", jailer={"api_sock": "run/x.sock"}),
    Case(
        "socket-path-too-long",
        "lib",
        "jailer.chroot_base_dir",
        {"vm_id": "s" * 64, "jailer": {"chroot_base_dir": "{jail}/" + "d" * 40}},
        needs_root=True,  # unjailed (not root), the jail's socket path does not matter
    ),
    lib("vsock-path-escape", "vsock_uds_path", vsock_uds_path="/run/../../etc/v.sock"),
    lib("parent-cgroup-escape", "jailer.parent_cgroup", jailer={"parent_cgroup": "a/../../x"}),
    lib("parent-cgroup-newline", "jailer.parent_cgroup", jailer={"parent_cgroup": "a\nb"}),
    lib("cpuset-newline", "jailer.cpuset_cpus", jailer={"cpuset_cpus": "0-1\n"}),
    # --- networks
    lib("tap-loopback", "tap_host_cidr", tap_host_cidr="127.0.0.1/30"),
    lib("tap-multicast", "tap_host_cidr", tap_host_cidr="224.0.0.1/30"),
    lib("tap-garbage", "tap_host_cidr", tap_host_cidr="10.0.0.1/30; rm -rf /"),
    lib("uplink-loopback", "uplink_subnet", uplink_subnet="127.0.0.0/30"),
    lib("uplink-multicast", "uplink_subnet", uplink_subnet="239.1.1.0/30"),
    lib("uplink-link-local", "uplink_subnet", uplink_subnet="169.254.169.252/30"),
    lib("uplink-reserved", "uplink_subnet", uplink_subnet="240.0.0.0/30"),
    lib("uplink-this-network", "uplink_subnet", uplink_subnet="0.0.0.4/30"),
    lib("uplink-broadcast", "uplink_subnet", uplink_subnet="255.255.255.252/30"),
    lib("uplink-not-30", "uplink_subnet", uplink_subnet="10.0.0.0/24"),
    lib("uplink-host-bits", "uplink_subnet", uplink_subnet="10.0.0.1/30"),
    lib("uplink-overlaps-tap", "uplink_subnet", uplink_subnet="172.30.0.0/30"),
    Case(
        "uplink-overlaps-host-route",
        "lib",
        "uplink_subnet",
        {"uplink_subnet": "10.77.3.0/30"},
        fake_routes=True,
    ),
    # --- TOML files (vm run --config / vm start --config)
    toml("toml-vcpus-true", "vcpu_count", "vcpu_count = true"),
    toml("toml-memory-string", "memory_mb", 'memory_mb = "512"'),
    toml("toml-memory-petabyte", "memory_mb", f"memory_mb = {PETABYTE_MIB}"),
    toml("toml-id-newline", "vm_id", 'vm_id = "x\\n"'),
    toml("toml-id-datetime", "vm_id", "vm_id = 1979-05-27T07:32:00Z"),
    toml("toml-boot-args-escape", "boot_args", 'boot_args = "a\\u001bb"'),
    toml("toml-networking-string", "enable_networking", 'enable_networking = "true"'),
    toml("toml-uplink-link-local", "uplink_subnet", 'uplink_subnet = "169.254.0.0/30"'),
    toml("toml-jailer-not-a-table", "jailer", "jailer = 5"),
    toml("toml-uid-true", "jailer.uid", jailer="uid = true"),
    toml("toml-no-file-float", "jailer.no_file", jailer="no_file = 2048.0"),
    toml("toml-chroot-empty", "jailer.chroot_base_dir", jailer='chroot_base_dir = ""'),
    toml("toml-netns-missing", "jailer.netns", jailer='netns = "/run/netns/ironclaw-nope"'),
    toml(
        "toml-kernel-symlink-outside-image-dirs",
        "kernel_path",
        'kernel_path = "{shadow_link}"\nimage_dirs = ["{images}"]',
    ),
    Case("toml-not-utf8", "toml-raw", "not UTF-8", b'vm_id = "caf\xe9"\n'),
    Case("toml-invalid", "toml-raw", "not valid TOML", b"vm_id = \n"),
    Case("toml-is-a-directory", "toml-raw", "cannot be read", None),
    Case("toml-missing", "toml-raw", "does not exist", "missing"),
    toml("start-toml-uid-true", "jailer.uid", jailer="uid = true", start=True),
    toml("start-toml-netns-missing", "jailer.netns", jailer='netns = "/nope/net"', start=True),
    toml("start-toml-memory-over-ram", "memory_mb", f"memory_mb = {HOST_MIB + 1}", start=True),
    # --- flags (vm run / vm start)
    flags("flag-id-newline", "vm_id", "--id", "x\n"),
    flags("flag-vcpus-zero", "vcpu_count", "--vcpus", "0"),
    flags("flag-memory-petabyte", "memory_mb", "--memory", str(PETABYTE_MIB)),
    flags("flag-memory-over-ram", "memory_mb", "--memory", str(HOST_MIB + 1)),
    flags("flag-boot-args-control", "boot_args", "--boot-args", "a\x01b"),
    flags("flag-kernel-missing", "kernel_path", "--kernel", "/nonexistent/vmlinux"),
    flags("flag-kernel-directory", "kernel_path", "--kernel", "{dir}"),
    flags("flag-rootfs-device", "rootfs_path", "--rootfs", "/dev/null"),
    flags(
        "flag-kernel-symlink-env-dirs",
        "kernel_path",
        "--kernel",
        "{shadow_link}",
        IRONCLAW_IMAGE_DIRS="{images}",
    ),
    flags("start-flag-id-newline", "vm_id", "--id", "x\n", start=True),
    flags("start-flag-memory-petabyte", "memory_mb", "--memory", str(PETABYTE_MIB), start=True),
    flags("start-flag-memory-over-ram", "memory_mb", "--memory", str(HOST_MIB + 1), start=True),
    flags("start-flag-kernel-missing", "kernel_path", "--kernel", "/nonexistent/k", start=True),
    flags("start-flag-boot-args-nl", "boot_args", "--boot-args", "a\nb", start=True),
    flags(
        "start-flag-rootfs-symlink",
        "rootfs_path",
        "--kernel",
        "{kernel}",
        "--rootfs",
        "{shadow_link}",
        start=True,
        IRONCLAW_IMAGE_DIRS="{images}",
    ),
]


class Spawned(Exception):
    """Raised by the sentinels: the input got as far as starting a process."""


class Reached(Exception):
    """Raised by the registry claim sentinel: the input got as far as making resources."""


@dataclass
class Host:
    token: str
    vm_id: str
    root: Path
    standin: StandinHost
    places: dict[str, str]
    spawned: list[str]

    @property
    def jail(self) -> Path:
        return self.standin.base

    @property
    def state(self) -> Path:
        return self.standin.state

    def fill(self, value: Any) -> Any:
        """``value`` with ``{images}``-style placeholders replaced (recursively)."""
        if isinstance(value, str):
            return value.format(**self.places)
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        return value

    def left_behind(self) -> list[str]:
        return self.standin.made() + leftovers(
            self.token, chroot_bases=(self.jail, Path("/var/jail"))
        )


@pytest.fixture(scope="session")
def probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("probe-cache")


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    yield from make_refusal_host(monkeypatch)


@pytest.fixture
def host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, probe_cache: Path, standin: StandinHost
) -> Iterator[Host]:
    token = uuid.uuid4().hex[:10]
    images = tmp_path / "images"
    images.mkdir()
    kernel = images / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + bytes(60))
    shadow_link = images / "rootfs.ext4"
    shadow_link.symlink_to("/etc/shadow" if Path("/etc/shadow").exists() else "/etc/passwd")
    (tmp_path / "a-dir").mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    h = Host(
        token=token,
        vm_id=f"hostile-{token}",
        root=tmp_path,
        standin=standin,
        places={
            "images": str(images),
            "kernel": str(kernel),
            "shadow_link": str(shadow_link),
            "dir": str(tmp_path / "a-dir"),
            "fifo": str(fifo),
            "jail": str(standin.base),
        },
        spawned=[],
    )
    monkeypatch.setenv("IRONCLAW_CACHE_DIR", str(probe_cache))
    for var in ("IRONCLAW_REQUIRE_SANDBOX", "IRONCLAW_IMAGE_DIRS"):
        monkeypatch.delenv(var, raising=False)

    def sentinel(what: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            h.spawned.append(f"{what}{args[:2]!r}")
            raise Spawned(f"{what} was called: the input was not refused before spawning")

        return refuse

    def claim(*args: Any, **kwargs: Any) -> Any:
        raise Reached("the registry claim was reached: the input was not refused up front")

    monkeypatch.setattr(os, "posix_spawn", sentinel("os.posix_spawn"))
    monkeypatch.setattr(os, "fork", sentinel("os.fork"))
    monkeypatch.setattr(subprocess, "Popen", sentinel("subprocess.Popen"))
    monkeypatch.setattr(detached_cli, "spawn_supervisor", sentinel("spawn_supervisor"))
    monkeypatch.setattr(Registry, "claim", claim)
    yield h


def _library(case: Case, h: Host, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    data: dict[str, Any] = {
        "vm_id": h.vm_id,
        "kernel_path": h.places["kernel"],
        "rootfs_path": None,
        "memory_mb": 128,
        "jailer": {"chroot_base_dir": str(h.jail)},
    }
    for key, value in h.fill(case.data).items():
        if key == "jailer" and isinstance(value, dict):
            data["jailer"] = {**data["jailer"], **value}
        else:
            data[key] = value

    async def attempt() -> None:
        vm = await start_firecracker(VmConfig(**data), registry=Registry(h.state))
        await vm.stop()  # only if the input was accepted: never leave a VM behind
        pytest.fail(f"{case.name}: accepted and started")

    with pytest.raises(ConfigError) as info:
        asyncio.run(attempt())
    return exit_code_for(info.value), str(info.value)


def _toml_text(case: Case, h: Host) -> str:
    top, jailer = (h.fill(part) for part in case.data)
    head = "" if re.search(r"^vm_id\s*=", top, re.M) else f'vm_id = "{h.vm_id}"\n'
    if re.search(r"^jailer\s*=", top, re.M):
        return head + top + "\n"
    base = "" if "chroot_base_dir" in jailer else f'chroot_base_dir = "{h.jail}"\n'
    return f"{head}{top}\n[jailer]\n{base}{jailer}\n"


def _cli(case: Case, h: Host) -> tuple[int, str]:
    command = ["vm", "start"] if case.via.startswith("start") else ["vm", "run"]
    if case.via in ("toml", "start-toml", "toml-raw"):
        cfg = h.root / "vm.toml"
        if case.via == "toml-raw":
            if case.data is None:
                cfg = h.root / "a-dir"
            elif case.data == "missing":
                cfg = h.root / "no-such.toml"
            else:
                cfg.write_bytes(case.data)
        else:
            cfg.write_text(_toml_text(case, h))
        argv = [*command, "--config", str(cfg)]
    else:
        argv = [*command, *h.fill(case.data)]
        if "--id" not in argv:
            argv += ["--id", h.vm_id]
    result = runner.invoke(app, argv, env={k: h.fill(v) for k, v in case.env.items()})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_input_is_refused_early(
    case: Case, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case.needs_root and os.geteuid() != 0:
        pytest.skip("only a jailed VM (root) has this limit")
    if case.fake_routes:
        monkeypatch.setattr(hostroutes, "host_ipv4_routes", lambda: FAKE_ROUTES)
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    if case.via == "lib":
        for var, value in case.env.items():
            monkeypatch.setenv(var, host.fill(value))
        code, message = _library(case, host, monkeypatch)
    else:
        code, message = _cli(case, host)

    assert code == ExitCode.USAGE, f"{case.name}: exit {code}, output:\n{message}"
    assert "configuration error" in documented_exit_codes()[code]
    assert case.key in message, f"{case.name}: {case.key!r} not named in:\n{message}"
    assert "Traceback" not in message
    assert host.spawned == []
    children_after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert children_after <= children_before
    assert host.left_behind() == []


def test_the_table_is_large_and_covers_every_entry_point() -> None:
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)
    vias = {c.via for c in CASES}
    assert {"lib", "toml", "flags", "start-flags", "start-toml", "toml-raw"} <= vias


def test_a_real_host_route_is_refused(host: Host) -> None:
    """The uplink check reads the host's real routes (not only addresses)."""
    routes = [
        r
        for r in hostcheck.host_ipv4_routes()
        if 1 < r.network.prefixlen <= 30 and not r.network.is_loopback
    ]
    if not routes:
        pytest.skip("this host has no non-default IPv4 route to collide with")
    net = routes[0].network
    subnet = str(next(net.subnets(new_prefix=30)))
    if ipaddress.IPv4Network(subnet).is_link_local or net.is_multicast or net.is_reserved:
        pytest.skip(f"the host's route {net} is in a range the model refuses anyway")
    with pytest.raises(ConfigError, match=r"uplink_subnet .* overlaps the host's route"):
        hostcheck.check_uplink_routes(subnet)


# --------------------------------------------------------------------------- real process

SUBPROCESS_CASES = [
    (["vm", "run", "--memory", str(PETABYTE_MIB)], "memory_mb"),
    (["vm", "start", "-d", "--id", "bad\n"], "vm_id"),
    (["vm", "run", "--boot-args", "console=ttyS0\x1b"], "boot_args"),
    (["vm", "run", "--config", "{not_utf8}"], "not UTF-8"),
]


def ironclaw(argv: list[str], probe_cache: Path) -> subprocess.CompletedProcess[str]:
    """``python -m ironclaw_orchestrator.cli ARGV``: on the stand-in host of the test (its
    environment carries it, see ``standin/boot``)."""
    return subprocess.run(
        [sys.executable, "-m", "ironclaw_orchestrator.cli", *argv],
        env={**os.environ, "IRONCLAW_CACHE_DIR": str(probe_cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("argv", "key"), SUBPROCESS_CASES, ids=lambda v: str(v)[:30])
def test_hostile_input_through_a_real_process(
    argv: list[str], key: str, tmp_path: Path, probe_cache: Path, standin: StandinHost
) -> None:
    token = uuid.uuid4().hex[:10]
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes(b'vm_id = "caf\xe9"\n')
    argv = [a.format(not_utf8=not_utf8) for a in argv]
    if "--id" not in argv:
        argv += ["--id", f"hostile-{token}"]
    proc = ironclaw(argv, probe_cache)
    assert standin.made() == [], proc.stderr  # accepted: it started on the stand-ins
    assert proc.returncode == ExitCode.USAGE, proc.stderr
    assert key in proc.stderr and "Traceback" not in proc.stderr
    assert leftovers(token) == []


def test_a_real_process_starts_on_the_stand_in_host(
    tmp_path: Path, probe_cache: Path, standin: StandinHost
) -> None:
    """The safety net of the test above: an accepted start in an ``ironclaw`` subprocess runs
    the stand-in jailer and firecracker under the stand-in host's roots, nothing real."""
    token = uuid.uuid4().hex[:10]
    assert standin.ctl["after_start"] == "exit:0"  # the "guest" ends at once: vm run exits 0
    before = standin.snapshot()
    argv = ["vm", "run", "--id", f"hostile-{token}", "--memory", "128", "--no-seccomp"]
    proc = ironclaw(argv, probe_cache)  # (a Python stand-in has no seccomp filter)
    assert proc.returncode == 0, proc.stderr
    assert [s["program"] for s in standin.spawned()] == ["jailer", "firecracker"]
    jailer_argv = standin.spawned()[0]["argv"]
    assert jailer_argv[jailer_argv.index("--chroot-base-dir") + 1] == str(standin.base)
    assert standin.snapshot() == before  # and vm run removed all it made
    assert leftovers(token) == []
