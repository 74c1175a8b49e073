"""A guest flooding its serial console cannot fill the host: the real jailer + firecracker,
the FLOOD probe guest, a small ``console_limit_bytes``, attached (library) and detached (CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import (
    FirecrackerProcess,
    VmConfig,
    WarmPool,
    restore_snapshot,
    start_firecracker,
)
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.consolelog import MARKER_PREFIX, rotated_path
from ironclaw_orchestrator.vm.consoleread import dropped_bytes, read_tail
from ironclaw_orchestrator.vm.probe import (
    PROBE_BOOT_ARGS,
    ProbeBehaviour,
    parse_counts,
    probe_kernel_path,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers

pytestmark = pytest.mark.integration

BUDGET = 32 << 10
#: Generous: the flood is slow on a loaded, emulated host (tests wait for behaviour).
TIMEOUT_S = 120.0


@pytest.fixture
def cl_id(real_host: None) -> Iterator[str]:
    ident = f"cl-{uuid.uuid4().hex[:10]}"
    yield ident
    left = leftovers(ident)
    assert not left, f"test left VM resources behind: {left}"


def on_disk(console: Path) -> int:
    """Every console file of the VM (a rotation's temporary files too)."""
    try:
        files = list(console.parent.iterdir())
    except FileNotFoundError:
        return 0
    total = 0
    for f in files:
        if f.name.startswith(console.name):
            with contextlib.suppress(FileNotFoundError):
                total += f.stat().st_size
    return total


def flood_until(console: Path, done: Callable[[], bool], alive: Callable[[], bool]) -> None:
    """Sample the files' size until ``done()``: never over the budget, the VMM alive."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        assert time.monotonic() < deadline, f"flood did not get there: {read_tail(console)}"
        assert on_disk(console) <= BUDGET
        assert alive(), read_tail(console)
        time.sleep(0.05)


async def aflood_until(vm: FirecrackerProcess, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        assert time.monotonic() < deadline, f"flood did not get there: {vm.console_tail()}"
        assert on_disk(vm.console_path) <= BUDGET
        assert vm.vmm.returncode is None, vm.console_tail()
        await asyncio.sleep(0.05)


def kept_counts(console: Path) -> list[int]:
    """The whole count lines kept (after a stall Firecracker v1.0.0 writes runs of bare
    newlines, longer than any tail: so all that is kept is read)."""
    read_tail(console, 1)  # takes in what the terminal still holds
    text = b""
    for path in (rotated_path(console), console):
        with contextlib.suppress(FileNotFoundError):
            text += path.read_bytes()
    return parse_counts(text.decode(errors="replace"))


def newest_count(console: Path) -> int:
    counts = kept_counts(console)
    assert counts, read_tail(console)
    return counts[-1]


def flood_config(vm_id: str) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.FLOOD)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        console_limit_bytes=BUDGET,
    )


async def test_flooding_guest_stays_within_its_console_budget(cl_id: str, tmp_path: Path) -> None:
    vm = await start_firecracker(flood_config(cl_id), registry=Registry(tmp_path / "state"))
    async with vm:
        console = vm.console_path
        await vm.start_instance()
        start = time.monotonic()
        await aflood_until(vm, lambda: vm.console_dropped_bytes > 0)
        first_dropped = vm.console_dropped_bytes
        seen = newest_count(console)
        assert (await vm.api.describe())["state"] == "Running"
        # Two more rotations: the counter grows.
        await aflood_until(vm, lambda: vm.console_dropped_bytes > first_dropped + BUDGET // 2)
        elapsed = time.monotonic() - start
        stats = await vm.stats()
        dropped = stats.console_dropped_bytes
        assert dropped is not None and dropped > first_dropped
        rate = (dropped + on_disk(console)) / elapsed
        print(f"flood: {rate / 1024:.1f} KiB/s against a budget of {BUDGET} bytes")

        # The tail shows the newest lines, after the marker at the top of console.log.1.
        assert newest_count(console) > seen
        assert rotated_path(console).read_text(errors="replace").startswith(MARKER_PREFIX)
        assert f"console_limit_bytes={BUDGET}" in rotated_path(console).read_text("latin-1")
        assert vm.console_dropped_bytes == dropped

        # The owner stops reading (its loop busy): the pipe fills and firecracker drops
        # serial output; the VMM and its API stay responsive, the files stay put. (Pauses
        # are left out: v1.0.0 on this host can stall on a pause during a flood either way.)
        pump = vm.vmm.console
        assert pump is not None
        pump._detach()
        await asyncio.sleep(1.0)
        size = on_disk(console)
        for _ in range(3):
            assert (await vm.api.describe())["state"] == "Running"
            await asyncio.sleep(0.2)
        assert vm.vmm.returncode is None and on_disk(console) == size
        before = newest_count(console)
        pump.attach()
        await aflood_until(vm, lambda: newest_count(console) > before)
    assert not console.parent.exists()


async def assert_flood_within_budget(vm: FirecrackerProcess) -> None:
    """The VM floods (its count goes on), its files stay within budget, drops are counted."""
    console = vm.console_path
    await aflood_until(vm, lambda: bool(kept_counts(console)))
    before, dropped = newest_count(console), vm.console_dropped_bytes
    await aflood_until(vm, lambda: vm.console_dropped_bytes > dropped + BUDGET // 2)
    assert (await vm.api.describe())["state"] == "Running"
    assert newest_count(console) > before
    assert (await vm.stats()).console_dropped_bytes == vm.console_dropped_bytes


async def test_restored_and_pooled_vms_have_the_same_budget(cl_id: str, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "state")
    src = await start_firecracker(flood_config(cl_id), registry=registry)
    async with src:
        await src.start_instance()
        await asyncio.sleep(0.5)
        snap = await src.snapshot(tmp_path / "snap", resume=False)
    clone = await restore_snapshot(snap, f"{cl_id}-r", registry=registry)
    async with clone:
        await assert_flood_within_budget(clone)

    template = flood_config("cl-pool-template")
    async with WarmPool(template, size=1, registry=registry) as pool:
        pooled = await pool.claim(f"{cl_id}-p")
        jail_id = pooled.vmm.vm_id
        async with pooled:
            await assert_flood_within_budget(pooled)
    assert not leftovers(jail_id)


def cli(state: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ironclaw_orchestrator.cli", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def state(tmp_path: Path, cl_id: str, chroot_base: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    try:
        yield path
    finally:
        rec = Registry(path).get(cl_id)
        if rec is not None and rec.owner_alive():
            cli(path, "vm", "stop", cl_id, "--timeout", "10")
        if Registry(path).get(cl_id) is not None:
            cli(path, "gc", "--id", cl_id, "--chroot-base", str(chroot_base), "--grace", "0")
        assert Registry(path).get(cl_id) is None


def test_detached_flood_and_logs_follow_across_rotations(state: Path, cl_id: str) -> None:
    kernel = probe_kernel_path(ProbeBehaviour.FLOOD)
    result = cli(
        state, "vm", "start", "-d", "--id", cl_id, "--kernel", str(kernel), "--memory", "128",
        "--boot-args", PROBE_BOOT_ARGS, "--console-limit", "32KiB",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rec = Registry(state).get(cl_id)
    assert rec is not None and rec.console_path is not None and rec.api_socket is not None
    console = rec.console_path

    argv = [sys.executable, "-m", "ironclaw_orchestrator.cli", "--state-dir", str(state)]
    follow = subprocess.Popen(
        [*argv, "vm", "logs", "-f", cl_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    followed = bytearray()
    reader = threading.Thread(target=read_all, args=(follow, followed), daemon=True)
    reader.start()
    try:
        # Several rotations, read from the files as any process can.
        flood_until(console, lambda: dropped_bytes(console) > 2 * BUDGET, rec.vmm_alive)
        answer = asyncio.run(_describe(rec.api_socket, cl_id))
        assert answer["state"] == "Running"

        stats = cli(state, "vm", "stats", cl_id, "--json")
        assert stats.returncode == 0, stats.stderr
        dropped = json.loads(stats.stdout)["console_dropped_bytes"]
        assert dropped > 0
        newest = newest_count(console)
        assert rotated_path(console).read_text("latin-1").startswith(MARKER_PREFIX)

        stop = cli(state, "vm", "stop", cl_id)
        assert stop.returncode == 0, stop.stderr
        follow.wait(timeout=30)  # ends by itself once the VM is gone
        reader.join(timeout=10)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, follow.stderr.read() if follow.stderr else ""
    # It followed far more than a budget's worth: across several rotations, in order.
    counts = parse_counts(followed.decode(errors="replace"))
    assert len(followed) > 2 * BUDGET, len(followed)
    assert counts and counts[-1] >= newest
    backwards = [(a, b) for a, b in itertools.pairwise(counts) if b <= a]
    assert not backwards, backwards[:5]


def read_all(proc: subprocess.Popen[bytes], into: bytearray) -> None:
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(65536):
        into += chunk


async def _describe(socket: Path, vm_id: str) -> dict[str, object]:
    api = FirecrackerApi(socket, vm_id=vm_id)
    try:
        return await api.describe()
    finally:
        await api.aclose()


def test_flooding_vm_outlives_its_killed_supervisor_until_gc(
    state: Path, cl_id: str, chroot_base: Path
) -> None:
    """The console's reader dies with its owner: firecracker's writes then fail (EPIPE, its
    SIGPIPE blocked), the VMM keeps running as any orphan does, and gc removes it."""
    kernel = probe_kernel_path(ProbeBehaviour.FLOOD)
    result = cli(
        state, "vm", "start", "-d", "--id", cl_id, "--kernel", str(kernel), "--memory", "128",
        "--boot-args", PROBE_BOOT_ARGS, "--console-limit", "32KiB",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rec = Registry(state).get(cl_id)
    assert rec is not None and rec.console_path is not None and rec.api_socket is not None
    flood_until(rec.console_path, lambda: dropped_bytes(rec.console_path) > 0, rec.vmm_alive)

    os.kill(rec.owner_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while rec.owner_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not rec.owner_alive()
    time.sleep(2.0)  # the guest floods on into a pipe nobody reads
    assert rec.vmm_alive()
    assert asyncio.run(_describe(rec.api_socket, cl_id))["state"] == "Running"
    assert rec.vmm_alive()

    gc = cli(state, "gc", "--json", "--id", cl_id, "--chroot-base", str(chroot_base))
    assert gc.returncode == 0, gc.stdout + gc.stderr
    done = {a["kind"]: a["action"] for a in json.loads(gc.stdout)["actions"]}
    assert done["vmm"] == "killed" and done["record"] == "removed"
    assert Registry(state).get(cl_id) is None
