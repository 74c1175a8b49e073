"""Cancellation at any moment of a real start or stop leaves nothing on the host.

Each sweep cancels at a dense series of delays (sub-millisecond steps over the first few
milliseconds, where the run dir, jail, namespace and cgroups are made, then 1 ms steps past
the API's readiness), each VM under an id of its own, then checks the host with
``leftovers()`` for the sweep's id prefix: a finding names the delay that leaked it. (One
check per sweep rather than per VM: a check walks all of /proc, and a step that finishes in
a thread after the cancel would create its resource later, so a check at the end sees it
too.)
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator import names
from ironclaw_orchestrator.errors import CgroupError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import (
    FirecrackerProcess,
    JailerConfig,
    Snapshot,
    VmConfig,
    WarmPool,
    restore_snapshot,
    start_firecracker,
)
from ironclaw_orchestrator.vm import pool as pool_mod
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path
from ironclaw_orchestrator.vm.process import become_subreaper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers

pytestmark = pytest.mark.integration

CGROUP_ROOT = Path("/sys/fs/cgroup")

#: 0-5 ms in 0.2 ms steps, then 5-40 ms in 1 ms steps: 60 cancellation points.
START_DELAYS = [i * 0.0002 for i in range(25)] + [0.005 + i * 0.001 for i in range(36)]
#: A stop takes a few ms (SIGKILL, reap, remove); how many depends on the host, so the
#: sweep is spread over a measured stop: 24 points inside it, 10 after it (34 in all).
STOP_POINTS_INSIDE, STOP_POINTS_AFTER = 24, 10


def stop_delays(stop_s: float) -> list[float]:
    inside = [stop_s * i / STOP_POINTS_INSIDE for i in range(STOP_POINTS_INSIDE)]
    return inside + [stop_s * (1 + i) for i in range(1, STOP_POINTS_AFTER + 1)]


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("IRONCLAW_STATE_DIR", str(path))
    return path


@pytest.fixture
def prefix(real_host: None, state_dir: Path) -> Iterator[str]:
    """An id prefix of this test's own (other engineers' VMs are never looked at)."""
    become_subreaper()
    Path("/var/jail").mkdir(mode=0o755, exist_ok=True)
    pre = f"cx-{uuid.uuid4().hex[:6]}-"
    yield pre
    left = leaks(pre)
    assert not left, f"test left VM resources behind: {left}"


def probe_config(vm_id: str, **kw: Any) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        **kw,
    )


def vm_cgroups(pre: str) -> list[str]:
    """VM cgroups (``.../ironclaw/<id>``) of ids starting with ``pre``, in every hierarchy."""
    found = []
    for dirpath, dirnames, _ in os.walk(CGROUP_ROOT):
        if len(Path(dirpath).relative_to(CGROUP_ROOT).parts) > 8:
            dirnames.clear()
        elif Path(dirpath).name == names.PARENT_CGROUP_NAME:
            found += [f"cgroup {dirpath}/{d}" for d in dirnames if d.startswith(pre)]
    return found


def leaks(pre: str) -> list[str]:
    return leftovers(pre) + vm_cgroups(pre)


def leaks_by_delay(pre: str, delays: list[float]) -> dict[str, list[str]]:
    """Leftovers of ``pre``, grouped by the delay (``<pre><index>``) each belongs to."""
    found: dict[str, list[str]] = {}
    for item in leaks(pre):
        m = re.search(re.escape(pre) + r"(\d+)", item)
        key = f"{delays[int(m.group(1))] * 1000:.2f} ms" if m else "?"
        found.setdefault(key, []).append(item)
    return found


async def cancel_sweep(
    pre: str, delays: list[float], start: Callable[[str], Awaitable[FirecrackerProcess]]
) -> int:
    """Cancel ``start(id)`` after each delay; a start that won the race is stopped.
    Returns how many were cancelled (re-raising ``CancelledError``, as they must)."""
    cancelled = 0
    for i, delay in enumerate(delays):
        task = asyncio.ensure_future(start(f"{pre}{i}"))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            vm = await task
        except asyncio.CancelledError:
            cancelled += 1
            continue
        await vm.stop(timeout_s=0)
    return cancelled


@pytest.mark.parametrize("networking", [False, True], ids=["plain", "tap+uplink"])
async def test_start_cancelled_at_any_moment_leaves_nothing(
    prefix: str, state_dir: Path, networking: bool
) -> None:
    net: dict[str, Any] = (
        {"enable_networking": True, "uplink_subnet": "10.231.7.0/30"} if networking else {}
    )

    async def start(vm_id: str) -> FirecrackerProcess:
        return await start_firecracker(probe_config(vm_id, require_sandbox=True, **net))

    cancelled = await cancel_sweep(prefix, START_DELAYS, start)
    assert leaks_by_delay(prefix, START_DELAYS) == {}
    assert Registry(state_dir).list() == []
    assert cancelled >= len(START_DELAYS) // 3  # the sweep really hit the start-up


async def test_unjailed_start_cancelled_at_any_moment_leaves_nothing(
    prefix: str, state_dir: Path
) -> None:
    delays = START_DELAYS[::2]

    async def start(vm_id: str) -> FirecrackerProcess:
        return await start_firecracker(probe_config(vm_id), use_jailer=False)

    await cancel_sweep(prefix, delays, start)
    assert leaks_by_delay(prefix, delays) == {}
    assert Registry(state_dir).list() == []


async def test_restore_cancelled_at_any_moment_leaves_nothing(
    prefix: str, state_dir: Path, tmp_path: Path
) -> None:
    src = await start_firecracker(probe_config(f"{prefix}src", require_sandbox=True))
    try:
        await src.start_instance()
        snap = await src.snapshot(tmp_path / "snap")
    finally:
        await src.stop(timeout_s=0)
    loaded = Snapshot.load(snap.path)
    delays = START_DELAYS[::2]

    async def start(vm_id: str) -> FirecrackerProcess:
        return await restore_snapshot(loaded, vm_id)

    await cancel_sweep(f"{prefix}r", delays, start)
    assert leaks_by_delay(f"{prefix}r", delays) == {}
    assert Registry(state_dir).list() == []


@pytest.mark.parametrize("booted", [False, True], ids=["configured", "booted"])
async def test_stop_cancelled_at_any_moment_then_called_again_finishes(
    prefix: str, state_dir: Path, booted: bool
) -> None:
    # How long an uncancelled stop of this kind takes here (median of 3).
    took: list[float] = []
    for i in range(3):
        vm = await start_firecracker(probe_config(f"{prefix}m{i}", require_sandbox=True))
        if booted:
            await vm.start_instance()
        t0 = time.perf_counter()
        await vm.stop(timeout_s=0.05)
        took.append(time.perf_counter() - t0)
    delays = stop_delays(sorted(took)[1])
    cancelled = 0
    for i, delay in enumerate(delays):
        vm = await start_firecracker(probe_config(f"{prefix}{i}", require_sandbox=True))
        if booted:
            await vm.start_instance()  # the halting probe ignores Ctrl-Alt-Del: killed
        stopping = asyncio.ensure_future(vm.stop(timeout_s=0.05))
        await asyncio.sleep(delay)
        stopping.cancel()
        try:
            await stopping
        except asyncio.CancelledError:
            cancelled += 1
        await vm.stop(timeout_s=0.05)  # waits for, or resumes, the cancelled one
        assert not vm.vmm.process.alive
    assert leaks_by_delay(prefix, delays) == {}
    assert leaks(f"{prefix}m") == []
    assert Registry(state_dir).list() == []
    assert cancelled >= len(delays) // 3  # the sweep really hit the stop


async def test_one_failed_start_in_a_task_group_cancels_the_rest_leaving_nothing(
    prefix: str, state_dir: Path
) -> None:
    """Five VMs run in a task group, each ``async with start_firecracker(...)``; one fails
    late (its cgroup value is refused by the kernel, after its run dir, jail and namespace
    exist): the group cancels the others, mid-start or running, and nothing is left."""

    async def run(vm_id: str, **kw: Any) -> None:
        async with start_firecracker(probe_config(vm_id, require_sandbox=True, **kw)) as vm:
            await vm.start_instance()
            await asyncio.sleep(60)  # cancelled by the failure of a sibling

    for round_ in range(3):  # the failure meets the others at different stages
        with pytest.raises(ExceptionGroup) as info:
            async with asyncio.TaskGroup() as group:
                for i in range(4):
                    group.create_task(run(f"{prefix}{round_}-{i}"))
                await asyncio.sleep(0.02 * round_)
                bad = JailerConfig(cpuset_cpus="999")
                group.create_task(run(f"{prefix}{round_}-bad", jailer=bad))
        assert info.group_contains(CgroupError)
        assert len(info.value.exceptions) == 1  # the others were cancelled, not failed
    assert leaks(prefix) == []
    assert Registry(state_dir).list() == []


async def test_warm_pool_claim_and_close_cancelled_leave_nothing(
    prefix: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool_mod, "POOL_ID_PREFIX", f"{prefix}pool-")
    delays = [i * 0.001 for i in range(0, 40, 4)]
    pool = WarmPool(probe_config("template", require_sandbox=True), size=1)
    try:
        await pool.start()
        for i, delay in enumerate(delays):
            task = asyncio.ensure_future(pool.claim(f"{prefix}{i}"))
            await asyncio.sleep(delay)
            task.cancel()
            try:
                vm = await task
            except asyncio.CancelledError:
                continue
            await vm.stop(timeout_s=0)
    finally:
        closing = asyncio.ensure_future(pool.close())
        await asyncio.sleep(0)
        closing.cancel()  # close runs to its end all the same
        with pytest.raises(asyncio.CancelledError):
            await closing
    assert leaks_by_delay(prefix, delays) == {}
    assert Registry(state_dir).list() == []
