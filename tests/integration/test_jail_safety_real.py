"""Real jailer + firecracker: gc never harms a live VM, a lost pid file never leaks the VMM,
and a start that loses the race for an id removes only what it created."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from ironclaw_orchestrator import names, procfs
from ironclaw_orchestrator.errors import CgroupError, ConfigError, JailerError
from ironclaw_orchestrator.gc import collect_garbage
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import JailerConfig, VmConfig, start_firecracker
from ironclaw_orchestrator.vm import jailer as jailer_mod
from ironclaw_orchestrator.vm import netns as ns
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path
from ironclaw_orchestrator.vm.process import become_subreaper

pytestmark = pytest.mark.integration


def config(vm_id: str, **jailer: object) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        require_sandbox=True,
        jailer=JailerConfig(**jailer) if jailer else None,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("variant", ["no-pid-ns", "pid-file-gone"])
async def test_gc_of_another_state_dir_leaves_a_live_vm_alone(
    vm_id: str, chroot_base: Path, tmp_path: Path, variant: str
) -> None:
    """Started unrecorded (or its pid file deleted), seen by a gc with another state dir and
    no grace period: the VM keeps its jail, socket, netns and cgroups and still answers."""
    cfg = config(vm_id, new_pid_ns=False) if variant == "no-pid-ns" else config(vm_id)
    vm = await start_firecracker(cfg, record=False)
    try:
        jail = vm.vmm.jail_dir  # type: ignore[union-attr]
        if variant == "pid-file-gone":
            names.pid_file(jail).unlink()
        assert not names.pid_file(jail).exists()
        report = await asyncio.to_thread(
            collect_garbage, Registry(tmp_path / "other-state"),
            chroot_bases=(chroot_base,), orphan_grace_s=0.0,
        )  # fmt: skip
        mine = [a for a in report.actions if a.vm_id == vm_id]
        assert mine and all(a.action == "skipped" for a in mine), report.to_dict()
        assert str(vm.pid) in mine[0].reason
        assert jail.is_dir() and vm.socket_path.is_socket()
        assert vm.vmm.netns_path is not None and Path(vm.vmm.netns_path).exists()  # type: ignore[union-attr]
        await vm.api.describe()  # still answers
    finally:
        await vm.stop()


async def test_missing_pid_file_at_start_kills_and_reaps_the_vmm(
    vm_id: str, chroot_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the pid file is not where we look, the VMM is found by its root and killed: no
    orphan, no zombie, no jail left (the vm_id fixture checks the host afterwards)."""
    become_subreaper()
    real = names.pid_file
    monkeypatch.setattr(jailer_mod.names, "pid_file", lambda jail: real(jail).with_name("x.pid"))
    before = set(procfs.children_of(os.getpid()))
    with pytest.raises(JailerError, match="killed its VMM") as info:
        await start_firecracker(config(vm_id), record=False)
    assert "missing or invalid" in str(info.value)
    assert set(procfs.children_of(os.getpid())) <= before  # reaped, not a zombie


@pytest.mark.parametrize("variant", ["plain", "networked", "networked-race"])
async def test_losing_start_removes_only_what_it_created(
    vm_id: str, chroot_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """Two orchestrators (separate state dirs, run dirs, chroot bases) start the same id:
    the loser fails and removes only its own run dir and jail; the winner's namespace, jail
    and VM are untouched. A plain VM's namespace has no name, so its cgroup decides; a
    networked VM's named namespace decides (``race``: both passed the early check, the
    exclusive netns claim decides)."""
    networked = variant != "plain"

    def cfg(**jailer: object) -> VmConfig:
        c = config(vm_id, **jailer) if jailer else config(vm_id)
        if networked:
            c = c.model_copy(update={"enable_networking": True, "tap_host_cidr": "10.254.7.1/29"})
        return c

    winner = await start_firecracker(cfg(), registry=Registry(tmp_path / "a"))
    other_base = Path(f"/tmp/icb-{os.getpid()}")  # short: socket paths must fit 107 bytes
    try:
        netns = ns.netns_name(vm_id)
        other_base.mkdir(mode=0o755)
        monkeypatch.setenv("IRONCLAW_RUN_DIR", str(tmp_path / "run-b"))
        if variant == "networked-race":
            monkeypatch.setattr(jailer_mod, "_netns_taken", lambda cfg, named: None)
        # A named namespace is claimed first (ConfigError); a plain VM's cgroup clashes.
        error: type[Exception] = ConfigError if networked else CgroupError
        match = f"network namespace .*{netns} already exists" if networked else "already exists"
        with pytest.raises(error, match=match):
            await start_firecracker(
                cfg(chroot_base_dir=other_base), registry=Registry(tmp_path / "b")
            )
        if networked:
            assert netns in ns.list_netns()
        assert winner.vmm.jail_dir.is_dir()  # type: ignore[union-attr]
        await winner.api.describe()
        assert not list(other_base.rglob(vm_id)) and not list((tmp_path / "run-b").rglob(vm_id))
        assert Registry(tmp_path / "b").get(vm_id) is None
    finally:
        await winner.stop()
        shutil.rmtree(other_base, ignore_errors=True)
