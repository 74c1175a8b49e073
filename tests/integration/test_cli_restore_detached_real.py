"""``ironclaw vm restore DIR -d``: a restored VM supervised like ``vm start -d``, for real.

The snapshot is of the counting probe, so the detached clone's console shows whether it
continues the count from the snapshot (memory and vCPU state restored) rather than booting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator.registry import Registry, is_alive
from ironclaw_orchestrator.vm import JailerConfig, Snapshot, VmConfig, start_firecracker
from ironclaw_orchestrator.vm.probe import (
    PROBE_BOOT_ARGS,
    READY_LINE,
    ProbeBehaviour,
    parse_counts,
    probe_kernel_path,
)

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers  # noqa: E402


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ironclaw_orchestrator.cli", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _wait_dead(pid: int, start: int | None, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid, start) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # ours to reap if pytest is a subreaper
        time.sleep(0.02)
    assert not is_alive(pid, start), f"pid {pid} still alive"


@pytest.fixture
def state(tmp_path: Path, vm_id: str, chroot_base: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    if Registry(path).list():  # a failed test: stop what is left, then gc
        cli(path, "vm", "stop", "--all")
        cli(path, "gc", "--id", f"{vm_id}-r", "--chroot-base", str(chroot_base), "--grace", "0")
    assert Registry(path).list() == []


@pytest.fixture
def counting_snapshot(vm_id: str, state: Path, tmp_path: Path) -> tuple[Path, int]:
    """A snapshot of the counting probe (taken paused) and the last count it printed."""

    async def take() -> tuple[Path, int]:
        config = VmConfig(
            vm_id=vm_id,
            kernel_path=str(probe_kernel_path(ProbeBehaviour.COUNT)),
            rootfs_path=None,
            memory_mb=128,
            boot_args=PROBE_BOOT_ARGS,
            require_sandbox=True,
            # The busy guest must leave its VMM's API thread some CPU (see test_snapshot_real).
            jailer=JailerConfig(cpu_limit=2.0),
        )
        async with start_firecracker(config, registry=Registry(state)) as vm:
            await vm.start_instance()
            deadline = time.monotonic() + 60
            while len(parse_counts(vm.console_path.read_text(errors="replace"))) < 10:
                assert time.monotonic() < deadline, vm.console_tail()
                await asyncio.sleep(0.02)
            snap = await vm.snapshot(tmp_path / "snap", resume=False)
            at_pause = parse_counts(vm.console_path.read_text())[-1]
            await vm.stop(timeout_s=0.2)
            return snap.path, at_pause

    return asyncio.run(take())


def _counts(state: Path, vm_id: str, n: int) -> tuple[list[int], str]:
    deadline = time.monotonic() + 60
    while True:
        logs = cli(state, "vm", "logs", vm_id)
        assert logs.returncode == 0, logs.stderr
        counts = parse_counts(logs.stdout)
        if len(counts) >= n:
            return counts, logs.stdout
        assert time.monotonic() < deadline, logs.stdout[-2000:]
        time.sleep(0.05)


def _ls(state: Path) -> dict[str, dict[str, Any]]:
    result = cli(state, "vm", "ls", "--json")
    assert result.returncode == 0, result.stderr
    return {row["vm_id"]: row for row in json.loads(result.stdout)}


def test_restore_detached_continues_the_count_then_stops(
    state: Path, vm_id: str, counting_snapshot: tuple[Path, int]
) -> None:
    snap_dir, at_pause = counting_snapshot
    clone = f"{vm_id}-r"
    result = cli(state, "vm", "restore", str(snap_dir), "--id", clone, "-d", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["vm_id"] == clone and record["state"] == "running" and record["detached"]
    # The CLI has exited; the clone runs on under its supervisor, counting on from the pause.
    rec = Registry(state).get(clone)
    assert rec is not None and rec.owner_alive() and rec.vmm_alive()
    assert rec.owner_pid != os.getpid() and rec.uid is not None
    assert os.stat(f"/proc/{rec.vmm_pid}").st_uid == rec.uid
    counts, console = _counts(state, clone, 5)
    assert READY_LINE not in console  # restored, not booted
    assert at_pause <= counts[0] <= at_pause + 2, (at_pause, counts[:3])
    assert counts == list(range(counts[0], counts[0] + len(counts)))
    assert _ls(state)[clone]["status"] == "running"

    stopped = cli(state, "vm", "stop", clone)
    assert stopped.returncode == 0, stopped.stderr
    assert rec.vmm_pid is not None
    _wait_dead(rec.vmm_pid, rec.vmm_start_time)
    assert _ls(state) == {}
    assert not leftovers(clone)
    assert Snapshot.load(snap_dir).memory_path.stat().st_nlink == 1  # unlinked from the jail


def test_restore_detached_paused_and_gc_after_killed_supervisor(
    state: Path, vm_id: str, chroot_base: Path, counting_snapshot: tuple[Path, int]
) -> None:
    snap_dir, _ = counting_snapshot
    clone = f"{vm_id}-r"
    result = cli(state, "vm", "restore", str(snap_dir), "--id", clone, "-d", "--paused")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == clone
    rec = Registry(state).get(clone)
    assert rec is not None and rec.detached and rec.vmm_pid is not None
    assert cli(state, "vm", "resume", clone).returncode == 0
    _counts(state, clone, 3)

    os.kill(rec.owner_pid, signal.SIGKILL)
    _wait_dead(rec.owner_pid, rec.owner_start_time)
    assert rec.vmm_alive(), "the VMM must outlive its killed supervisor"
    assert _ls(state)[clone]["status"] == "stale"
    gc = cli(state, "gc", "--json", "--id", clone, "--chroot-base", str(chroot_base))
    assert gc.returncode == 0, gc.stdout + gc.stderr
    done = {a["kind"]: a["action"] for a in json.loads(gc.stdout)["actions"]}
    assert done["vmm"] == "killed" and done["record"] == "removed"
    _wait_dead(rec.vmm_pid, rec.vmm_start_time)
    assert Registry(state).get(clone) is None
    assert not leftovers(clone)


def test_restore_detached_refuses_a_damaged_snapshot(
    state: Path, vm_id: str, counting_snapshot: tuple[Path, int]
) -> None:
    snap_dir, _ = counting_snapshot
    vmstate = snap_dir / "vmstate"
    os.chmod(vmstate, 0o644)
    with open(vmstate, "r+b") as f:
        f.write(b"\0\0\0\0")
    result = cli(state, "vm", "restore", str(snap_dir), "--id", f"{vm_id}-r", "-d")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "altered" in result.stderr
    assert Registry(state).list() == []
    assert not [p for p in state.iterdir() if p.name.startswith((".spawn-", ".config-"))]
    assert not leftovers(f"{vm_id}-r")
