"""Soak: many VMs started and stopped concurrently leave nothing behind and leak nothing.

Opt-in (it takes minutes): ``IRONCLAW_SOAK=1 sudo .venv/bin/python -m pytest -m soak``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import psutil
import pytest
from leftovers import leftovers

from ironclaw_orchestrator.vm import VmConfig, fswatch, start_firecracker
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

pytestmark = [
    pytest.mark.integration,
    pytest.mark.soak,
    pytest.mark.opt_in("set IRONCLAW_SOAK=1"),
    pytest.mark.skipif(os.environ.get("IRONCLAW_SOAK") != "1", reason="set IRONCLAW_SOAK=1"),
    pytest.mark.timeout(3600),
]

CYCLES = int(os.environ.get("IRONCLAW_SOAK_CYCLES", "200"))
PARALLEL = int(os.environ.get("IRONCLAW_SOAK_PARALLEL", "16"))


async def one_cycle(prefix: str, n: int, kernel: Path) -> None:
    vm = await start_firecracker(
        VmConfig(
            vm_id=f"{prefix}-{n}",
            kernel_path=str(kernel),
            rootfs_path=None,
            memory_mb=128,
            boot_args=PROBE_BOOT_ARGS,
            require_sandbox=True,
        )
    )
    try:
        await vm.start_instance()
        assert await vm.wait() == 0
    finally:
        await vm.stop()


async def test_soak_start_stop_cycles(real_host: None, chroot_base: Path) -> None:
    prefix = f"soak-{uuid.uuid4().hex[:6]}"
    kernel = probe_kernel_path(ProbeBehaviour.RESET)
    me = psutil.Process()
    await one_cycle(prefix, -1, kernel)  # warm up caches, imports, the event loop
    # The readiness inotify instance is one per event loop (made on first use), not per VM.
    fds, rss = me.num_fds() - len(fswatch.kept_fds()), me.memory_info().rss
    sem = asyncio.Semaphore(PARALLEL)

    async def limited(n: int) -> None:
        async with sem:
            await one_cycle(prefix, n, kernel)

    results = await asyncio.gather(*(limited(n) for n in range(CYCLES)), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    # Every kind of resource (processes, jails, cgroups at any depth, netns, links, run dirs,
    # records, sockets) of every cycle's id; the per-test guard checks each claimed id too.
    assert leftovers(prefix, vm_ids=[f"{prefix}-{n}" for n in range(-1, CYCLES)]) == []
    assert me.num_fds() - len(fswatch.kept_fds()) <= fds
    assert me.memory_info().rss - rss < 32 << 20
