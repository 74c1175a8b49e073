"""A host for the stand-in jailer: binaries, chroot base, run dir, fake cgroups, seams.

``standin_host`` (a fixture, see :func:`make_host`) installs ``standin/jailer.py`` and
``standin/firecracker.py`` as executables run by this interpreter (``firecracker`` is a
symlink to ``firecracker-v1.0.0``, as a release install lays out), points the orchestrator
at a short private directory (socket paths have a 107-byte budget), and replaces what needs
root: the cgroup tree is a :class:`FakeKernel` (v1 hybrid or v2), ``is_root`` and
``check_kvm`` say yes. Everything else is the real code.
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

import ironclaw_orchestrator.vm as vm_pkg
from ironclaw_orchestrator.vm import binaries, cgroups, jailer
from ironclaw_orchestrator.vm.cgroups import CgroupLayout, VmCgroups
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig

SOURCES = Path(__file__).resolve().parent / "standin"
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
        return VmConfig(
            vm_id=vm_id,
            kernel_path=str(self.images / "vmlinux"),
            rootfs_path=str(self.images / "rootfs.ext4"),
            jailer=self.jailer_config(vm_id, **jailer_kw),
            **kw,
        )

    def jail(self, vm_id: str = "sa-1") -> Path:
        return self.base / self.exec_name / vm_id

    def cgroup_dirs(self, vm_id: str = "sa-1") -> list[Path]:
        return sorted(p for p in self.cg.rglob(vm_id) if p.is_dir())

    def snapshot(self) -> set[str]:
        """Every path under the jail base, the run dir and the cgroup tree (files included),
        but for what all VMs share and keep by design: ``<base>/<exec name>``, ``<run>/vms``
        and the binaries' version cache."""
        shared = {f"jail/{self.exec_name}", "run/vms", "run/binary-versions.json"}
        out = set()
        for top in (self.base, self.run, self.cg):
            out |= {str(p.relative_to(self.root)) for p in top.rglob("*")}
        return out - shared

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


def make_host(monkeypatch: pytest.MonkeyPatch, version: int) -> Iterator[StandinHost]:
    """Set up a stand-in host; on exit, remove it (tests assert what they left first)."""
    host = StandinHost(Path(tempfile.mkdtemp(prefix="sa-")), version)
    os.chmod(host.root, 0o755)
    try:
        _install(host)
        host.control(requests=str(host.root / "requests.jsonl"), cgroup_mounts={
            k: str(v) for k, v in host._mounts().items()})  # fmt: skip
        kernel = host.fs = _fake_cgroups(host)
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
        monkeypatch.setenv("IRONCLAW_STATE_DIR", str(host.root / "state"))
        yield host
    finally:
        shutil.rmtree(host.root, ignore_errors=True)
