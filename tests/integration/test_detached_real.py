"""Detached VMs, crashes and garbage collection against the real jailer + firecracker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jailcheck import assert_record_jailed

from ironclaw_orchestrator.errors import RegistryError
from ironclaw_orchestrator.gc import JAIL_MARKER, collect_garbage
from ironclaw_orchestrator.registry import Registry, VmRecord, is_alive
from ironclaw_orchestrator.supervisor import (
    list_vms,
    reap_supervisors,
    spawn_supervisor,
    stop_detached,
)
from ironclaw_orchestrator.vm import VmConfig
from ironclaw_orchestrator.vm import netns as ns
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path
from ironclaw_orchestrator.vm.process import become_subreaper

pytestmark = pytest.mark.integration


def probe_config(vm_id: str) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
    )


@pytest.fixture
def registry(tmp_path: Path, vm_id: str, chroot_base: Path) -> Iterator[Registry]:
    """A private state dir; whatever a test leaves of ``vm_id`` is collected afterwards."""
    # Orphaned VMMs are re-parented to us (not to PID 1) so that gc can reap them.
    become_subreaper()
    reg = Registry(tmp_path / "state")
    try:
        yield reg
    finally:
        rec = reg.get(vm_id)
        if rec is not None and rec.owner_alive():
            os.kill(rec.owner_pid, signal.SIGKILL)
            _wait_dead(rec.owner_pid, rec.owner_start_time)
        report = collect_garbage(
            reg, vm_ids=[vm_id], chroot_bases=(chroot_base,), orphan_grace_s=0.0
        )
        reap_supervisors()
        assert report.ok, report.to_dict()


def _wait_dead(pid: int, start: int | None, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not is_alive(pid, start), f"pid {pid} still alive"


def _resources_exist(rec: VmRecord) -> dict[str, bool]:
    # A VM without a tap has a nameless namespace: nothing to record or to remove by name.
    assert rec.cgroups is not None and rec.netns_name is None
    assert ns.netns_name(rec.vm_id) not in ns.list_netns()
    cg_dirs = [Path(m) / rec.cgroups["parent"] / rec.vm_id for m in rec.cgroups["mounts"].values()]
    return {
        "jail_dir": bool(rec.jail_dir and rec.jail_dir.exists()),
        "run_dir": bool(rec.run_dir and rec.run_dir.exists()),
        "cgroups": any(d.exists() for d in cg_dirs),
    }


async def test_detached_start_stop_leaves_nothing(
    registry: Registry, vm_id: str, chroot_base: Path, exec_name: str
) -> None:
    rec = await spawn_supervisor(probe_config(vm_id), registry)
    assert rec.state == "running" and rec.detached and rec.sandboxed
    assert_record_jailed(rec)  # the kernel agrees with the record
    assert rec.owner_pid != os.getpid() and rec.owner_alive()
    assert rec.vmm_alive() and rec.vmm_pid is not None
    assert rec.uid is not None and rec.uid >= 64_000 and rec.uid == rec.gid
    assert rec.jail_dir == chroot_base / exec_name / vm_id
    assert (rec.jail_dir / JAIL_MARKER).is_file()
    assert all(_resources_exist(rec).values())
    # The supervisor lives in a session of its own: the command that started it may exit.
    assert os.getsid(rec.owner_pid) == rec.owner_pid
    [status] = list_vms(registry)
    assert status.status == "running" and status.vmm_alive

    with pytest.raises(RegistryError, match=f"VM id {vm_id} is in use"):
        await spawn_supervisor(probe_config(vm_id), registry)
    assert registry.get(vm_id) == rec  # the failed second start did not touch the first

    assert await stop_detached(registry, vm_id) is None
    assert registry.get(vm_id) is None
    assert not is_alive(rec.vmm_pid, rec.vmm_start_time)
    assert not is_alive(rec.owner_pid, rec.owner_start_time)
    assert not any(_resources_exist(rec).values())
    assert sorted(p.name for p in registry.state_dir.iterdir()) == [".lock"]


async def test_killed_supervisor_is_cleaned_up_by_gc(
    registry: Registry, vm_id: str, chroot_base: Path
) -> None:
    rec = await spawn_supervisor(probe_config(vm_id), registry)
    os.kill(rec.owner_pid, signal.SIGKILL)
    _wait_dead(rec.owner_pid, rec.owner_start_time)
    await asyncio.sleep(0.2)
    assert rec.vmm_alive(), "the VMM must outlive its killed supervisor"
    [status] = list_vms(registry)
    assert status.status == "stale"
    with pytest.raises(RegistryError, match="ironclaw gc"):
        registry.claim(vm_id)

    dry = collect_garbage(registry, dry_run=True, chroot_bases=(chroot_base,))
    mine = [a for a in dry.actions if a.vm_id == vm_id]
    assert {a.kind for a in mine} >= {"vmm", "cgroups", "jail_dir", "run_dir", "record"}
    assert all(a.action.startswith("would") for a in mine)
    assert rec.vmm_alive() and all(_resources_exist(rec).values())

    report = collect_garbage(registry, chroot_bases=(chroot_base,), vm_ids=[vm_id])
    assert report.ok, report.to_dict()
    done = {a.kind: a.action for a in report.actions}
    assert done["vmm"] == "killed" and done["record"] == "removed"
    assert not is_alive(rec.vmm_pid, rec.vmm_start_time)
    assert not any(_resources_exist(rec).values())
    assert registry.get(vm_id) is None


async def test_killed_vmm_is_noticed_by_supervisor(registry: Registry, vm_id: str) -> None:
    rec = await spawn_supervisor(probe_config(vm_id), registry)
    assert rec.vmm_pid is not None
    os.kill(rec.vmm_pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while registry.get(vm_id) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert registry.get(vm_id) is None, "the supervisor did not clean up after its VMM died"
    _wait_dead(rec.owner_pid, rec.owner_start_time)
    assert not any(_resources_exist(rec).values())
