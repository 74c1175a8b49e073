"""The base of a Diff snapshot for callers without the VM's handle (``vm snapshot --diff``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_snapshot import make_snapshot

from ironclaw_orchestrator.errors import ConfigError, UsageError
from ironclaw_orchestrator.vm.binaries import Version
from ironclaw_orchestrator.vm.config import VmConfig
from ironclaw_orchestrator.vm.snapshot import SnapshotSource, snapshot_vm
from ironclaw_orchestrator.vm.snapshot_base import (
    LAST_SNAPSHOT,
    check_handle_base,
    diff_base,
    forget_base,
    remember_base,
)


def jail(tmp_path: Path) -> Path:
    path = tmp_path / "jail"
    (path / "root").mkdir(parents=True)
    return path


def test_no_note_and_no_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="took none since it started"):
        diff_base("vm-1", jail(tmp_path), None)


def test_the_noted_snapshot_is_the_base(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    jail_dir = jail(tmp_path)
    remember_base(jail_dir, snap)
    assert diff_base("vm-1", jail_dir, None).manifest == snap.manifest
    assert diff_base("vm-1", jail_dir, snap.path).path == snap.path  # --base may repeat it
    other = make_snapshot(tmp_path, name="other")
    with pytest.raises(UsageError, match="builds on its latest snapshot"):
        diff_base("vm-1", jail_dir, other.path)


def test_an_unfinished_snapshot_leaves_no_base(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    jail_dir = jail(tmp_path)
    remember_base(jail_dir, snap)
    forget_base(jail_dir)  # the next snapshot was asked for and never sealed
    for given in (None, snap.path):
        with pytest.raises(UsageError, match="did not complete"):
            diff_base("vm-1", jail_dir, given)
    assert [p.name for p in jail_dir.iterdir()] == sorted(["root", LAST_SNAPSHOT])  # no tmp


def test_a_replaced_base_is_refused(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    jail_dir = jail(tmp_path)
    remember_base(jail_dir, snap)
    shutil.rmtree(snap.path)
    other = make_snapshot(tmp_path, name="other")
    os.rename(other.path, snap.path)  # another snapshot now at the noted path
    with pytest.raises(UsageError, match="replaced since"):
        diff_base("vm-1", jail_dir, None)
    shutil.rmtree(snap.path)
    with pytest.raises(ConfigError, match="latest snapshot"):
        diff_base("vm-1", jail_dir, None)


def test_a_restored_vm_builds_on_the_snapshot_linked_in_its_jail(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    jail_dir = jail(tmp_path)
    os.link(snap.memory_path, jail_dir / "root" / "memory")  # as a restore stages it
    assert diff_base("vm-1", jail_dir, snap.path).path == snap.path
    other = make_snapshot(tmp_path, name="other")
    with pytest.raises(UsageError, match="was not restored from"):
        diff_base("vm-1", jail_dir, other.path)
    (jail_dir / "root" / "memory").unlink()
    shutil.copy(snap.memory_path, jail_dir / "root" / "memory")  # copied: not provable
    with pytest.raises(UsageError, match="was not restored from"):
        diff_base("vm-1", jail_dir, snap.path)


async def test_snapshot_vm_forgets_the_base_before_creating_and_notes_the_new_one(
    tmp_path: Path,
) -> None:
    jail_dir = jail(tmp_path)
    old = make_snapshot(tmp_path, name="old")
    remember_base(jail_dir, old)
    notes: list[Any] = []

    class Api:
        async def create_snapshot(self, body: dict[str, str]) -> None:
            notes.append(json.loads((jail_dir / LAST_SNAPSHOT).read_text()))
            for key in ("snapshot_path", "mem_file_path"):
                (jail_dir / "root" / body[key].lstrip("/")).write_bytes(b"x" * 4096)

        async def resume(self) -> None:
            return None

    cfg = VmConfig(vm_id="x", kernel_path="/k", rootfs_path=None)
    source = SnapshotSource(
        Api(),  # type: ignore[arg-type]
        jail_dir / "root",
        os.getuid(),
        os.getgid(),
        Version(1, 0, 0),
        cfg,
    )
    snap = await snapshot_vm(source, tmp_path / "new", was_paused=True)
    assert notes == [{"path": None}]  # no base while Firecracker resets its dirty-page log
    assert diff_base("x", jail_dir, None).path == snap.path


def test_a_handle_base_must_still_be_the_latest_snapshot(tmp_path: Path) -> None:
    """The owner's remembered base is refused once another process snapshotted the VM
    (which reset the dirty-page log), or while such a snapshot is unfinished."""
    mine = make_snapshot(tmp_path)
    jail_dir = jail(tmp_path)
    check_handle_base("vm-1", jail_dir, mine)  # no note: taken none since start (restored)
    remember_base(jail_dir, mine)
    check_handle_base("vm-1", jail_dir, mine)
    forget_base(jail_dir)  # `ironclaw vm snapshot` asked Firecracker for one just now
    with pytest.raises(UsageError, match="an unfinished one"):
        check_handle_base("vm-1", jail_dir, mine)
    theirs = make_snapshot(tmp_path, name="theirs")
    remember_base(jail_dir, theirs)
    with pytest.raises(UsageError, match="another process snapshotted it since"):
        check_handle_base("vm-1", jail_dir, mine)
