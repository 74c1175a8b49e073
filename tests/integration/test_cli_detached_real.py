"""``ironclaw vm start -d / ls / stats / logs / stop`` and ``ironclaw gc`` as real processes,
against the real jailer + firecracker and the probe guest."""

from __future__ import annotations

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
from jailcheck import assert_record_jailed

from ironclaw_orchestrator.registry import Registry, is_alive

pytestmark = pytest.mark.integration


def cli(state: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ironclaw_orchestrator.cli", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _reap(pid: int | None) -> None:
    """Reap ``pid`` if it ended up as our child (pytest may be a subreaper)."""
    if pid is None:
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _wait_dead(pid: int, start: int | None, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid, start) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.02)
    assert not is_alive(pid, start), f"pid {pid} still alive"


@pytest.fixture
def state(tmp_path: Path, vm_id: str, chroot_base: Path) -> Iterator[Path]:
    """A private state dir; whatever a test leaves of ``vm_id`` is stopped or collected."""
    path = tmp_path / "state"
    pids: list[int | None] = []
    try:
        yield path
    finally:
        rec = Registry(path).get(vm_id)
        if rec is not None:
            pids += [rec.owner_pid, rec.vmm_pid]
            if rec.owner_alive():
                cli(path, "vm", "stop", vm_id, "--timeout", "10")
            if Registry(path).get(vm_id) is not None:
                cli(path, "gc", "--id", vm_id, "--chroot-base", str(chroot_base), "--grace", "0")
        for pid in pids:
            _reap(pid)
        assert Registry(path).get(vm_id) is None


def _ls(state: Path) -> dict[str, dict[str, Any]]:
    result = cli(state, "vm", "ls", "--json")
    assert result.returncode == 0, result.stderr
    return {row["vm_id"]: row for row in json.loads(result.stdout)}


def _console_has(state: Path, vm_id: str, text: str, timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        result = cli(state, "vm", "logs", vm_id)
        assert result.returncode == 0, result.stderr
        if text in result.stdout or time.monotonic() > deadline:
            return result.stdout
        time.sleep(0.1)


def test_cli_start_ls_stats_logs_stop(state: Path, vm_id: str) -> None:
    result = cli(state, "vm", "start", "-d", "--id", vm_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == vm_id

    row = _ls(state)[vm_id]
    assert row["status"] == "running" and row["sandboxed"] is True and row["detached"]
    record = Registry(state).get(vm_id)
    assert record is not None
    assert_record_jailed(record)  # the kernel agrees with the record
    assert row["owner_alive"] and row["vmm_alive"] and row["memory_mb"] == 128
    table = cli(state, "vm", "ls")
    assert table.returncode == 0 and vm_id in table.stdout and "running" in table.stdout

    result = cli(state, "vm", "stats", vm_id, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["vm_id"] == vm_id and stats["memory_current_bytes"] > 0
    assert stats["cpu_usage_ns"] is not None and stats["cpu_usage_ns"] > 0
    assert stats["memory_limit_bytes"] == row["memory_limit_mb"] * 2**20

    assert "IRONCLAW-PROBE-READY" in _console_has(state, vm_id, "IRONCLAW-PROBE-READY")

    # A second start with the same id fails and leaves the first VM alone.
    again = cli(state, "vm", "start", "-d", "--id", vm_id)
    assert again.returncode == 1 and f"VM id {vm_id} is in use" in again.stderr
    assert _ls(state)[vm_id]["status"] == "running"

    # `logs -f` ends by itself when the VM is stopped.
    argv = [sys.executable, "-m", "ironclaw_orchestrator.cli", "--state-dir", str(state)]
    follow = subprocess.Popen(
        [*argv, "vm", "logs", "-f", vm_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        rec = Registry(state).get(vm_id)
        assert rec is not None
        result = cli(state, "vm", "stop", vm_id)
        assert result.returncode == 0, result.stderr
        assert f"stopped VM {vm_id}" in result.stdout
        out, _err = follow.communicate(timeout=20)
        assert follow.returncode == 0 and "IRONCLAW-PROBE-READY" in out
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()

    _wait_dead(rec.owner_pid, rec.owner_start_time)
    assert rec.vmm_pid is not None
    _wait_dead(rec.vmm_pid, rec.vmm_start_time)
    assert _ls(state) == {}
    assert sorted(p.name for p in state.iterdir()) == [".lock"]
    missing = cli(state, "vm", "stats", vm_id)
    assert missing.returncode == 2 and f"no VM '{vm_id}'" in missing.stderr


def test_cli_gc_after_killed_supervisor(state: Path, vm_id: str, chroot_base: Path) -> None:
    result = cli(state, "vm", "start", "-d", "--id", vm_id, "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["vm_id"] == vm_id and record["state"] == "running"
    rec = Registry(state).get(vm_id)
    assert rec is not None and rec.owner_pid == record["owner_pid"]

    os.kill(rec.owner_pid, signal.SIGKILL)
    _wait_dead(rec.owner_pid, rec.owner_start_time)
    assert rec.vmm_alive(), "the VMM must outlive its killed supervisor"
    assert _ls(state)[vm_id]["status"] == "stale"

    dry = cli(state, "gc", "--dry-run", "--json", "--id", vm_id)
    assert dry.returncode == 0, dry.stderr
    planned = {a["kind"]: a["action"] for a in json.loads(dry.stdout)["actions"]}
    assert planned["vmm"] == "would kill" and planned["record"] == "would remove"
    assert rec.vmm_alive() and Registry(state).get(vm_id) is not None

    # --id: other tests' VMs on this host are not ours to judge.
    result = cli(state, "gc", "--json", "--id", vm_id, "--chroot-base", str(chroot_base))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["dry_run"] is False
    done = {a["kind"]: a["action"] for a in report["actions"] if a["vm_id"] == vm_id}
    assert done["vmm"] == "killed" and done["record"] == "removed"
    assert {"cgroups", "jail_dir", "run_dir"} <= set(done)
    assert "netns" not in done, "a VM without a tap has a nameless namespace: it died with it"
    assert rec.vmm_pid is not None
    _wait_dead(rec.vmm_pid, rec.vmm_start_time)
    assert Registry(state).get(vm_id) is None
    assert _ls(state) == {}
