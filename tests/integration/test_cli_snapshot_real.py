"""``ironclaw vm pause / resume / snapshot / restore`` as real processes (probe guest)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jailcheck import assert_record_jailed

from ironclaw_orchestrator.gc import collect_garbage
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm.process import become_subreaper

pytestmark = pytest.mark.integration


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ironclaw_orchestrator.cli", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def state(tmp_path: Path, vm_id: str, chroot_base: Path) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    if Registry(path).list():  # a failed test: stop what is left, the gc way
        cli(path, "vm", "stop", "--all")
        become_subreaper()
        collect_garbage(Registry(path), vm_ids=[vm_id, f"{vm_id}-r"], orphan_grace_s=0)


def test_pause_resume_snapshot_restore(state: Path, vm_id: str, tmp_path: Path) -> None:
    started = cli(state, "vm", "start", "--id", vm_id, "--probe", "halt")
    assert started.returncode == 0, started.stderr
    try:
        record = Registry(state).get(vm_id)
        assert record is not None
        assert_record_jailed(record)  # not the unjailed fallback
        paused = cli(state, "vm", "pause", vm_id, "--json")
        assert paused.returncode == 0, paused.stderr
        assert json.loads(paused.stdout) == {"vm_id": vm_id, "state": "Paused"}
        assert cli(state, "vm", "resume", vm_id).returncode == 0

        snap_dir = tmp_path / "snap"
        taken = cli(state, "vm", "snapshot", vm_id, str(snap_dir), "--json")
        assert taken.returncode == 0, taken.stderr
        manifest = json.loads(taken.stdout)
        assert manifest["source_vm_id"] == vm_id and manifest["snapshot_type"] == "Full"
        assert set(manifest["files"]) == {"memory", "vmstate"}
        again = cli(state, "vm", "snapshot", vm_id, str(snap_dir))
        assert again.returncode == 2 and "already exists" in again.stderr

        restore = subprocess.Popen(
            [sys.executable, "-m", "ironclaw_orchestrator.cli", "--state-dir", str(state),
             "vm", "restore", str(snap_dir), "--id", f"{vm_id}-r", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert restore.stdout is not None
        first = ""
        deadline = time.monotonic() + 60
        while not first.rstrip().endswith("}") and time.monotonic() < deadline:
            first += restore.stdout.readline()
        info = json.loads(first)
        rec = Registry(state).get(f"{vm_id}-r")
        assert rec is not None and rec.vmm_pid == info["vmm_pid"]
        assert_record_jailed(rec)  # restored into a jail of its own
        restore.send_signal(signal.SIGINT)
        assert restore.wait(timeout=60) == 130, restore.stderr.read() if restore.stderr else ""
        assert Registry(state).get(f"{vm_id}-r") is None
    finally:
        stopped = cli(state, "vm", "stop", vm_id)
    assert stopped.returncode == 0, stopped.stderr
    assert Registry(state).list() == []
