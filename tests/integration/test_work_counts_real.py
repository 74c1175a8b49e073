"""Work per start, counted (never timed): registry writes and API connections of a real VM.

Guards the start-up cost (issue: per-VM CPU): a VM's record is written once when claimed
(with its uid/gid: the only new file), once before its namespace is made, and once when it
runs (both in place); the registry lock is opened once per process; the API is one
keep-alive connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jailcheck import assert_jailed

from ironclaw_orchestrator.registry import Registry, store
from ironclaw_orchestrator.vm import VmConfig, start_firecracker
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

pytestmark = pytest.mark.integration


async def test_registry_writes_and_api_connections_per_start(
    vm_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[str] = []
    new_files: list[str] = []
    lock_opens: list[str] = []
    real_write, real_tmp, real_open = (
        Registry._write_record,
        Registry._write_tmp,
        store.LockFile._open,
    )

    def counting_write(self: Registry, ident: str, data: bytes, **kw: Any) -> bytes:
        writes.append(ident)
        return real_write(self, ident, data, **kw)

    def counting_tmp(self: Registry, ident: str, data: bytes) -> str:
        new_files.append(ident)
        return real_tmp(self, ident, data)

    def counting_open(self: store.LockFile, *, create: bool) -> bool:
        lock_opens.append(self.path)
        return real_open(self, create=create)

    connections: list[str] = []
    real_connect = FirecrackerApi._connect

    async def counting_connect(self: FirecrackerApi) -> object:
        link = await real_connect(self)
        connections.append(str(self.socket_path))  # counted once connected
        return link

    monkeypatch.setattr(Registry, "_write_record", counting_write)
    monkeypatch.setattr(Registry, "_write_tmp", counting_tmp)
    monkeypatch.setattr(store.LockFile, "_open", counting_open)
    monkeypatch.setattr(FirecrackerApi, "_connect", counting_connect)
    registry = Registry(tmp_path / "state")
    cfg = VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.RESET)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
    )
    vm = await start_firecracker(cfg, use_jailer=True, registry=registry)
    try:
        assert_jailed(vm)
        assert writes == [vm_id] * 3, writes  # claim + ids, before cgroups and netns, running
        assert new_files == [vm_id], new_files  # the claim's; the updates write in place
        record = registry.get(vm_id)
        assert record is not None and record.vmm_pid == vm.pid and record.uid is not None
        assert record.jail_dir and record.cgroups
        assert record.netns_name is None  # nameless: nothing on the host to record
        await vm.start_instance()
        assert await vm.wait() == 0
    finally:
        await vm.stop()
    assert writes == [vm_id] * 3  # stop releases the record: no further write
    assert registry.get(vm_id) is None
    # One open of the registry lock for the whole process, not one per operation.
    assert lock_opens == [str(registry.lock_path)], lock_opens
    # Readiness, configuration, boot and Ctrl-Alt-Del: one keep-alive connection.
    assert connections == [str(vm.socket_path)], connections
