"""A host for the stand-in jailer: binaries, chroot base, run dir, fake cgroups, seams.

``standin_host`` (a fixture, see :func:`make_host`) installs ``standin/jailer.py`` and
``standin/firecracker.py`` as executables run by this interpreter (``firecracker`` is a
symlink to ``firecracker-v1.0.0``, as a release install lays out), points the orchestrator
at a short private directory (socket paths have a 107-byte budget), and replaces what needs
root: the cgroup tree is a :class:`FakeKernel` (v1 hybrid or v2), ``is_root`` and
``check_kvm`` say yes. Everything else is the real code.

:func:`make_refusal_host` makes a stand-in host for tests that expect a start to be
refused before anything is made: on top, the network layer is a :class:`FakeNet`, a config
that names no binaries or chroot base gets the stand-ins' (``$IRONCLAW_JAILER``,
``$IRONCLAW_FIRECRACKER``, the chroot base default), a start that reaches the jailer
stage with another chroot base fails the test at once, and an ``ironclaw`` or supervisor
process started from the test lands on the same stand-in host (``standin/boot``). Should a
refusal break (a code change, a mutant), the start runs on the stand-ins and the test's
:meth:`StandinHost.made` names what it made, instead of a real VM starting on this host.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fake_cgroupfs import FakeKernel
from fake_net import install as install_fake_net

import ironclaw_orchestrator.vm as vm_pkg
from ironclaw_orchestrator.registry import LOCK_NAME
from ironclaw_orchestrator.vm import binaries, cgroups, jailer
from ironclaw_orchestrator.vm.cgroups import CgroupLayout, VmCgroups, release_chains
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig

SOURCES = Path(__file__).resolve().parent / "standin"
#: ``<root>:<cgroup version>`` of a refusal host, in the environment of the processes a test
#: starts; with :data:`BOOT` on ``PYTHONPATH``, ``ironclaw`` and the supervisor join it.
HOST_ENV = "IRONCLAW_STANDIN_HOST"
BOOT = SOURCES / "boot"
V1 = ("cpu", "cpuacct", "cpuset", "memory", "pids", "blkio")
V2 = frozenset({"cpu", "cpuset", "io", "memory", "pids"})
#: The jail uid/gid: ours, unless we are root (uid 0 is refused as a jail uid).
JAIL_IDS = (os.getuid() or 64_123, os.getgid() or 64_123)


@dataclass
class StandinHost:
    root: Path
    version: int
    ctl: dict[str, Any] = field(default_factory=dict)
    fs: FakeKernel | None = None
    #: :meth:`snapshot` once set up (the fake cgroup mounts' own files).
    pristine: set[str] = field(default_factory=set)

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def base(self) -> Path:
        return self.root / "jail"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def cg(self) -> Path:
        return self.root / "cg"

    @property
    def images(self) -> Path:
        return self.root / "img"

    @property
    def exec_name(self) -> str:
        return "firecracker-v1.0.0"

    def control(self, **settings: Any) -> None:
        """Tell the stand-ins what to do (``fail=``, ``after_start=``, ...)."""
        self.ctl.update(settings)
        (self.bin / "standin.json").write_text(json.dumps(self.ctl))

    def requests(self) -> list[dict[str, Any]]:
        log = Path(self.ctl["requests"])
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def jailer_config(self, vm_id: str = "sa-1", **kw: Any) -> JailerConfig:
        kw.setdefault("uid", JAIL_IDS[0])
        kw.setdefault("gid", JAIL_IDS[1])
        kw.setdefault("isolate_network", False)
        kw.setdefault("no_seccomp", True)  # a Python stand-in has no seccomp filter to check
        return JailerConfig(
            jailer_id=vm_id,
            jailer_binary=self.bin / "jailer",
            exec_file=self.bin / "firecracker",
            chroot_base_dir=self.base,
            cgroup_version=self.version,
            **kw,
        )

    def vm_config(self, vm_id: str = "sa-1", **kw: Any) -> VmConfig:
        jailer_kw = kw.pop("jailer", {})
        kw.setdefault("kernel_path", str(self.images / "vmlinux"))
        kw.setdefault("rootfs_path", str(self.images / "rootfs.ext4"))
        return VmConfig(vm_id=vm_id, jailer=self.jailer_config(vm_id, **jailer_kw), **kw)

    def jail(self, vm_id: str = "sa-1") -> Path:
        return self.base / self.exec_name / vm_id

    def cgroup_dirs(self, vm_id: str = "sa-1") -> list[Path]:
        return sorted(p for p in self.cg.rglob(vm_id) if p.is_dir())

    def snapshot(self) -> set[str]:
        """Every path under the jail base, the run dir and the cgroup tree (files included),
        but for what all VMs share and keep by design: ``<base>/<exec name>``, ``<run>/vms``
        and the binaries' version cache. The cgroup parent chain this process keeps for its
        VMs is released first, as its exit would (a VM cgroup left behind still shows)."""
        release_chains([self.root / "cgroup.lock"])
        shared = {f"jail/{self.exec_name}", "run/vms", "run/binary-versions.json"}
        out = set()
        for top in (self.base, self.run, self.cg):
            out |= {str(p.relative_to(self.root)) for p in top.rglob("*")}
        return out - shared

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def netns_dir(self) -> Path:
        return self.root / "netns"

    def spawned(self) -> list[dict[str, Any]]:
        """Each run of the stand-in jailer or firecracker (``--version`` aside), in order."""
        log = Path(self.ctl["spawns"])
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def made(self) -> list[str]:
        """What was made since the host was set up (see :func:`make_refusal_host`): stand-in
        runs, paths under the jail base, run dir and cgroup tree, registry records and logs,
        network namespaces. ``[]`` after a refused start."""
        found = [f"spawned {s['program']} {s['argv']}" for s in self.spawned()]
        found += sorted(self.snapshot() - self.pristine)
        if self.state.exists():  # records, their logs and temp files; not the lock
            found += [f"registry {p.name}" for p in self.state.iterdir() if p.name != LOCK_NAME]
        if self.netns_dir.exists():
            found += [f"netns {p.name}" for p in self.netns_dir.iterdir()]
        return found

    def plant_neighbour(self, vm_id: str = "neighbour") -> list[Path]:
        """Another VM's jail, run dir and cgroup (same parent): nothing of ours may touch them."""
        jail = self.jail(vm_id)
        (jail / "root" / "run").mkdir(parents=True)
        (jail / "root" / f"{self.exec_name}.pid").write_text("4242")
        run = self.run / "vms" / vm_id
        run.mkdir(parents=True)
        fs = FakeKernel(self.cg)
        made = [jail, run]
        for mount in self._mounts().values():
            for d in (mount / "ironclaw", mount / "ironclaw" / vm_id):
                if self.version == 2:  # as the neighbour's own start did
                    fs.write(d.parent / "cgroup.subtree_control", "+cpu +memory +pids")
                if not d.exists():
                    fs.mkdir(d)
            fs.write(mount / "ironclaw" / vm_id / "cgroup.procs", "4242")
            made.append(mount / "ironclaw" / vm_id)
        return made

    def _mounts(self) -> dict[str, Path]:
        if self.version == 2:
            return {"unified": self.cg / "unified"}
        return {c: self.cg / c for c in V1}

    def layout(self) -> CgroupLayout:
        if self.version == 2:
            return CgroupLayout("v2", {}, self.cg / "unified", V2, {"": "/"})
        return CgroupLayout("v1", self._mounts(), None, frozenset(), {c: "/" for c in V1})


def _install(host: StandinHost) -> None:
    host.bin.mkdir()
    for name, target in (("jailer.py", "jailer"), ("firecracker.py", host.exec_name)):
        text = (SOURCES / name).read_text()
        (host.bin / target).write_text(f"#!{sys.executable}\n{text}")
        (host.bin / target).chmod(0o755)
    (host.bin / "firecracker").symlink_to(host.exec_name)
    for d in (host.base, host.run, host.images):
        d.mkdir(mode=0o755)
    (host.images / "vmlinux").write_bytes(b"\x7fELF stand-in kernel")
    (host.images / "rootfs.ext4").write_bytes(b"\0" * 4096)


def _fake_cgroups(host: StandinHost) -> FakeKernel:
    for key, mount in host._mounts().items():
        mount.mkdir(parents=True)
        (mount / "cgroup.procs").write_text("1\n")
        if key == "unified":
            (mount / "cgroup.controllers").write_text(" ".join(sorted(V2)) + "\n")
            (mount / "cgroup.subtree_control").write_text("")
            (mount / "cpuset.mems.effective").write_text("0\n")
            (mount / "cpuset.cpus.effective").write_text("0-1\n")
        if key == "cpuset":
            (mount / "cpuset.cpus").write_text("0-1\n")
            (mount / "cpuset.mems").write_text("0\n")
    return FakeKernel(host.cg)


def _patch(host: StandinHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the orchestrator at ``host``: fake cgroups, root and KVM said yes, private dirs."""
    kernel = host.fs
    assert kernel is not None
    lock = host.root / "cgroup.lock"

    class Cgroups(VmCgroups):
        """Planned on the fake kernel, with a private host lock."""

        @classmethod
        def plan(cls, *args: Any, **kw: Any) -> VmCgroups:
            kw.update(lock_path=lock, fs=kernel)
            return super().plan(*args[:5], **kw)

        @classmethod
        def from_dict(cls, data: dict[str, Any], fs: Any = None) -> VmCgroups:
            return super().from_dict(data, fs=kernel)

    monkeypatch.setattr(cgroups, "detect_layout", lambda *a, **k: host.layout())
    monkeypatch.setattr(cgroups, "VmCgroups", Cgroups)
    monkeypatch.setattr(jailer, "is_root", lambda: True)
    monkeypatch.setattr(jailer, "check_kvm", lambda *a: None)
    monkeypatch.setattr(vm_pkg, "is_root", lambda: True)
    monkeypatch.setattr(binaries, "_version_cache", {})
    monkeypatch.setenv("IRONCLAW_RUN_DIR", str(host.run))
    monkeypatch.setenv("IRONCLAW_STATE_DIR", str(host.state))


def make_host(
    monkeypatch: pytest.MonkeyPatch, version: int, parent: Path | None = None
) -> Iterator[StandinHost]:
    """Set up a stand-in host (in ``parent``, default ``$TMPDIR``); on exit, remove it
    (tests assert what they left first)."""
    host = StandinHost(Path(tempfile.mkdtemp(prefix="sa-", dir=parent)), version)
    os.chmod(host.root, 0o755)
    try:
        _install(host)
        host.control(
            requests=str(host.root / "requests.jsonl"),
            spawns=str(host.root / "spawns.jsonl"),
            cgroup_mounts={k: str(v) for k, v in host._mounts().items()},
        )
        host.fs = _fake_cgroups(host)
        _patch(host, monkeypatch)
        host.pristine = host.snapshot()
        yield host
    finally:
        shutil.rmtree(host.root, ignore_errors=True)


class EscapedStandinHost(AssertionError):
    """A start reached the jailer stage outside the stand-in host (a refusal did not hold)."""


def _guard(host: StandinHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a refusal host adds to :func:`_patch`: nothing a start could reach is real."""
    install_fake_net(monkeypatch, host.netns_dir)
    monkeypatch.setenv(binaries.JAILER_ENV, str(host.bin / "jailer"))
    monkeypatch.setenv(binaries.FIRECRACKER_ENV, str(host.bin / "firecracker"))
    real_jailer_config = VmConfig.jailer_config

    def jailer_config(self: VmConfig) -> JailerConfig:
        cfg = real_jailer_config(self)
        if "chroot_base_dir" in cfg.model_fields_set:
            return cfg
        return cfg.model_copy(update={"chroot_base_dir": host.base})

    monkeypatch.setattr(VmConfig, "jailer_config", jailer_config)
    real_check = jailer.check_chroot_base

    def check_chroot_base(base: Path, **kw: Any) -> None:
        if not Path(base).resolve().is_relative_to(host.root.resolve()):
            raise EscapedStandinHost(
                f"a start reached the jailer with chroot base {base}, outside the stand-in "
                f"host {host.root}: a refusal did not hold"
            )
        real_check(base, **kw)

    monkeypatch.setattr(jailer, "check_chroot_base", check_chroot_base)
    monkeypatch.setenv(HOST_ENV, f"{host.root}:{host.version}")
    path = os.environ.get("PYTHONPATH", "")
    if str(BOOT) not in path.split(":"):
        monkeypatch.setenv("PYTHONPATH", f"{BOOT}:{path}" if path else str(BOOT))


def make_refusal_host(monkeypatch: pytest.MonkeyPatch, version: int = 2) -> Iterator[StandinHost]:
    """A stand-in host for refusal tests (see the module docstring); assert ``made() == []``."""
    # In /tmp itself: the shortest chroot base, so that a start that got through anyway fits
    # the socket path budget (or it is refused there, never reaching the stand-ins).
    hosts = make_host(monkeypatch, version, Path("/tmp"))
    host = next(hosts)
    try:
        _guard(host, monkeypatch)
        # A start that got through anyway ends on its own once booted (`vm run` returns).
        host.control(after_start="exit:0")
        host.pristine = host.snapshot()
        yield host
    finally:
        hosts.close()


def join_from_child(spec: str) -> None:
    """In an ``ironclaw`` or supervisor process started by a test: join its refusal host.

    Patches this process for good (it ends with the command); see ``standin/boot``.
    """
    root, _, version = spec.rpartition(":")
    host = StandinHost(Path(root), int(version))
    host.ctl = json.loads((host.bin / "standin.json").read_text())
    host.fs = FakeKernel(host.cg)
    monkeypatch = pytest.MonkeyPatch()
    _patch(host, monkeypatch)
    _guard(host, monkeypatch)
