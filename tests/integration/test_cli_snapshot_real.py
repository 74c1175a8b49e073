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


def test_diff_snapshots_from_the_cli(state: Path, vm_id: str, tmp_path: Path) -> None:
    """``vm snapshot --diff``: refused without a base, built on the VM's latest snapshot
    (found by itself), chained, and for a restored VM on the snapshot it came from (given
    with --base and proven by the memory file linked in its jail); every Diff restores."""
    config = tmp_path / "vm.toml"
    config.write_text("track_dirty_pages = true\n")
    restored = f"{vm_id}-r"
    started = cli(state, "vm", "start", "--id", vm_id, "--probe", "halt", "-c", str(config))
    assert started.returncode == 0, started.stderr
    try:
        first = cli(state, "vm", "snapshot", vm_id, str(tmp_path / "d0"), "--diff")
        assert first.returncode == 2 and "took none since it started" in first.stderr
        assert not (tmp_path / "d0").exists()
        assert cli(state, "vm", "snapshot", vm_id, str(tmp_path / "full")).returncode == 0
        d1 = cli(state, "vm", "snapshot", vm_id, str(tmp_path / "d1"), "--diff", "--json")
        assert d1.returncode == 0, d1.stderr
        manifest = json.loads(d1.stdout)
        assert manifest["snapshot_type"] == "Diff"
        assert manifest["base"]["path"] == str(tmp_path / "full")
        stale = cli(state, "vm", "snapshot", vm_id, str(tmp_path / "d2"), "--diff", "--base",
                    str(tmp_path / "full"))  # fmt: skip
        assert stale.returncode == 2 and "builds on its latest snapshot" in stale.stderr
        d2 = cli(state, "vm", "snapshot", vm_id, str(tmp_path / "d2"), "--diff", "--json")
        assert d2.returncode == 0, d2.stderr
        assert json.loads(d2.stdout)["base"]["path"] == str(tmp_path / "d1")  # chained

        up = cli(state, "vm", "restore", str(tmp_path / "d2"), "--id", restored, "-d")
        assert up.returncode == 0, up.stderr
        no_base = cli(state, "vm", "snapshot", restored, str(tmp_path / "r1"), "--diff")
        assert no_base.returncode == 2 and "--base" in no_base.stderr
        wrong = cli(state, "vm", "snapshot", restored, str(tmp_path / "r1"), "--diff",
                    "--base", str(tmp_path / "d1"))  # fmt: skip
        assert wrong.returncode == 2 and "was not restored from" in wrong.stderr
        r1 = cli(state, "vm", "snapshot", restored, str(tmp_path / "r1"), "--diff",
                 "--base", str(tmp_path / "d2"), "--json")  # fmt: skip
        assert r1.returncode == 0, r1.stderr
        assert json.loads(r1.stdout)["snapshot_type"] == "Diff"
        assert cli(state, "vm", "stop", restored).returncode == 0
        again = cli(state, "vm", "restore", str(tmp_path / "r1"), "--id", restored, "-d")
        assert again.returncode == 0, again.stderr  # the Diff is a complete snapshot
        rec = Registry(state).get(restored)
        assert rec is not None and rec.vmm_alive()
    finally:
        cli(state, "vm", "stop", restored)
        stopped = cli(state, "vm", "stop", vm_id)
    assert stopped.returncode == 0, stopped.stderr
    assert Registry(state).list() == []
