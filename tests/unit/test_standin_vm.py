"""start_firecracker and the supervisor against the stand-in jailer: configure, boot, stop,
the registry record at each step, and rollback when the API or the VMM fails."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import pytest
from standin_host import StandinHost, make_host

from ironclaw_orchestrator import supervisor
from ironclaw_orchestrator.errors import ApiError, CleanupError, IronclawError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import cleanup, start_firecracker


@pytest.fixture(params=[1, 2], ids=["cgroup-v1", "cgroup-v2"])
def host(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    monkeypatch.delenv("IRONCLAW_REQUIRE_SANDBOX", raising=False)
    yield from make_host(monkeypatch, request.param)


@pytest.fixture
def registry(host: StandinHost) -> Registry:
    return Registry(host.root / "state")


async def test_configure_boot_and_graceful_stop(host: StandinHost, registry: Registry) -> None:
    neighbour = host.plant_neighbour()
    before = host.snapshot()
    cfg = host.vm_config(boot_args="console=ttyS0 reboot=k panic=1 marker=42", vcpu_count=2)
    vm = await start_firecracker(cfg, registry=registry, ready_timeout_s=30)
    try:
        assert vm.is_sandboxed
        rec = registry.get("sa-1")
        assert rec is not None and rec.sandboxed
        assert rec.jail_dir == host.jail() and rec.vmm_pid == vm.pid
        assert rec.cgroups is not None and rec.cgroups["vm_id"] == "sa-1"
        await vm.start_instance()
    finally:
        code = await vm.stop()
    assert code == 0  # SendCtrlAltDel: the guest rebooted, the VMM exited by itself
    calls = {(r["method"], r["path"]): r["body"] for r in host.requests()}
    assert calls[("PUT", "/machine-config")] == {"vcpu_count": 2, "mem_size_mib": cfg.memory_mb}
    boot = calls[("PUT", "/boot-source")]
    assert boot == {"kernel_image_path": "/vmlinux", "boot_args": cfg.boot_args}
    drive = calls[("PUT", "/drives/rootfs")]
    assert drive["path_on_host"] == "/rootfs.ext4" and drive["is_root_device"] is True
    actions = [r["body"]["action_type"] for r in host.requests() if r["path"] == "/actions"]
    assert actions == ["InstanceStart", "SendCtrlAltDel"]
    assert registry.get("sa-1") is None
    assert host.snapshot() == before
    assert all(p.exists() for p in neighbour)


async def test_guest_exit_code_and_stubborn_guest(host: StandinHost, registry: Registry) -> None:
    before = host.snapshot()
    host.control(after_start="exit:3")
    async with start_firecracker(host.vm_config(), registry=registry) as vm:
        await vm.start_instance()
        assert await vm.wait() == 3
    assert host.snapshot() == before and registry.get("sa-1") is None
    host.control(after_start="", ignore_ctrl_alt_del=True)
    vm = await start_firecracker(host.vm_config(), registry=registry)
    await vm.start_instance()
    assert await vm.stop(timeout_s=0.2) == -9  # ignored Ctrl-Alt-Del: SIGKILL
    assert host.snapshot() == before and registry.get("sa-1") is None


async def test_stop_without_grace_sends_no_ctrl_alt_del(
    host: StandinHost, registry: Registry
) -> None:
    """``stop(timeout_s=0)`` gives the guest no time: no request to wait for, SIGKILL."""
    before = host.snapshot()
    host.control(after_start="")
    vm = await start_firecracker(host.vm_config(), registry=registry)
    await vm.start_instance()
    assert await vm.stop(timeout_s=0) == -9
    actions = [r["body"]["action_type"] for r in host.requests() if r["path"] == "/actions"]
    assert actions == ["InstanceStart"]
    assert host.snapshot() == before and registry.get("sa-1") is None


@pytest.mark.parametrize("fail", ["api-400:PUT /boot-source", "api-400:PUT /drives/rootfs"])
async def test_api_refusal_rolls_back_and_releases_the_id(
    host: StandinHost, registry: Registry, fail: str
) -> None:
    neighbour = host.plant_neighbour()
    before = host.snapshot()
    host.control(fail=fail)
    with pytest.raises(ApiError, match="refused"):
        await start_firecracker(host.vm_config(), registry=registry)
    assert host.snapshot() == before
    assert registry.get("sa-1") is None
    assert all(p.exists() for p in neighbour)


async def test_vmm_dying_after_ready_rolls_back(host: StandinHost, registry: Registry) -> None:
    before = host.snapshot()
    host.control(fail="die-after-ready")
    with pytest.raises(IronclawError):
        await start_firecracker(host.vm_config(), registry=registry)
    assert host.snapshot() == before
    assert registry.get("sa-1") is None


async def test_failed_cleanup_keeps_a_record_naming_what_is_left(
    host: StandinHost, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = await start_firecracker(host.vm_config(), registry=registry)

    def busy(path: object) -> None:
        raise OSError(16, "Device or resource busy", str(path))

    monkeypatch.setattr(cleanup, "remove_jail_tree", busy)
    with pytest.raises(CleanupError, match="cleanup left some resources behind"):
        await vm.stop()
    rec = registry.get("sa-1")
    assert rec is not None and rec.jail_dir == host.jail()
    assert rec.cgroups is None and not host.cgroup_dirs()  # that part went
    monkeypatch.undo()
    cleanup.remove_jail_tree(host.jail())
    registry.release("sa-1")


async def test_supervisor_runs_and_stops_the_vm(host: StandinHost, registry: Registry) -> None:
    before = host.snapshot()
    config = host.vm_config()
    registry.claim("sa-1", detached=True)
    read_end, write_end = os.pipe()
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        supervisor._run(registry, config, stop, supervisor._Notifier(write_end))
    )
    try:
        msg = json.loads(await asyncio.to_thread(os.read, read_end, 4096))
        assert msg["event"] == "running" and msg["vmm_pid"] > 0
        rec = registry.get("sa-1")
        assert rec is not None and rec.state == "running" and rec.vmm_pid == msg["vmm_pid"]
        stop.set()
        assert await task == 0
    finally:
        os.close(read_end)
    assert registry.get("sa-1") is None
    assert host.snapshot() == before


async def test_supervisor_reports_a_failed_start(host: StandinHost, registry: Registry) -> None:
    before = host.snapshot()
    host.control(fail="exit-before-socket")
    registry.claim("sa-1", detached=True)
    read_end, write_end = os.pipe()
    try:
        code = await supervisor._run(
            registry, host.vm_config(), asyncio.Event(), supervisor._Notifier(write_end)
        )
        msg = json.loads(os.read(read_end, 4096))
    finally:
        os.close(read_end)
    assert code == 1
    assert msg["event"] == "error" and "failed before its socket" in msg["message"]
    assert registry.get("sa-1") is None
    assert host.snapshot() == before
