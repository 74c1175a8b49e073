"""Work before the real jailer is spawned, counted (never timed; issue 10): a jailed start
finds firecracker without scanning PATH again, resolves the exec file's name once and
checks the kernel once, and the jail is laid out under that name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from counting import counting
from jailcheck import assert_jailed

from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import (
    VmConfig,
    binaries,
    inputs,
    jailer,
    jailer_config,
    start_firecracker,
)
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

pytestmark = pytest.mark.integration


async def test_a_jailed_start_derives_its_inputs_once(
    vm_id: str, exec_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    firecracker = binaries.find_firecracker()  # where this host has them (scanned if on PATH)
    binaries.find_jailer()
    scans = counting(monkeypatch, shutil, "which")
    resolved = counting(monkeypatch, jailer_config, "real_path")
    checked = counting(monkeypatch, inputs, "check_source")
    monkeypatch.setattr(jailer, "check_source", inputs.check_source)
    kernel = probe_kernel_path(ProbeBehaviour.RESET)
    cfg = VmConfig(
        vm_id=vm_id, kernel_path=str(kernel), rootfs_path=None, memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
    )  # fmt: skip
    vm = await start_firecracker(cfg, use_jailer=True, registry=Registry(tmp_path / "state"))
    try:
        assert_jailed(vm)
        assert scans == []  # firecracker's place on PATH was remembered (nothing changed)
        assert resolved == [firecracker]  # once, by the input check; the start reused it
        assert checked == [kernel]
        assert vm.vmm.config.jail_dir.parent.name == exec_name  # the jailer's own name
        await vm.start_instance()
        assert await vm.wait() == 0
    finally:
        await vm.stop()
