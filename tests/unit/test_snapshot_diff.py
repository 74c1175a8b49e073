"""Diff snapshots: the dirty-page layer merged onto the base memory, and the manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm import snapshot_diff
from ironclaw_orchestrator.vm.binaries import Version
from ironclaw_orchestrator.vm.config import VmConfig
from ironclaw_orchestrator.vm.snapshot import Snapshot, seal_snapshot
from ironclaw_orchestrator.vm.snapshot_diff import check_reports_holes, merge_layer

PAGE = 4096
SIZE = 64 * PAGE


def layer_with(tmp_path: Path, pages: dict[int, bytes]) -> Path:
    """A file shaped like Firecracker's Diff memory: full size, only dirty pages written."""
    path = tmp_path / "memory.layer"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for page, data in pages.items():
            f.seek(page * PAGE)
            f.write(data.ljust(PAGE, b"\0"))
    return path


def test_merge_writes_only_the_dirty_pages_over_the_base(tmp_path: Path) -> None:
    base = os.urandom(SIZE)
    dest = tmp_path / "memory"
    dest.write_bytes(base)
    # A dirty page that is all zeros must still overwrite the base (it is data, not a hole).
    layer = layer_with(tmp_path, {3: b"three", 4: b"four", 40: b"\0"})
    assert merge_layer(layer, dest) == 3 * PAGE
    merged = dest.read_bytes()
    expected = bytearray(base)
    expected[3 * PAGE : 5 * PAGE] = b"three".ljust(PAGE, b"\0") + b"four".ljust(PAGE, b"\0")
    expected[40 * PAGE : 41 * PAGE] = bytes(PAGE)
    assert merged == bytes(expected)


def test_merge_refuses_a_base_of_another_size(tmp_path: Path) -> None:
    dest = tmp_path / "memory"
    dest.write_bytes(b"x" * (SIZE // 2))
    with pytest.raises(ConfigError, match="not a snapshot of this VM"):
        merge_layer(layer_with(tmp_path, {1: b"a"}), dest)


def test_filesystem_without_holes_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_reports_holes(tmp_path)  # tmp_path's filesystem reports holes here
    assert not list(tmp_path.iterdir())  # the probe file is gone
    monkeypatch.setattr(snapshot_diff, "_reports_holes", {})
    # A filesystem that reports no holes: every byte is data.
    monkeypatch.setattr(snapshot_diff, "data_extents", lambda fd, size: iter([(0, size)]))
    with pytest.raises(ConfigError, match="reports holes"):
        check_reports_holes(tmp_path)


def test_diff_manifest_names_its_base(tmp_path: Path) -> None:
    config = VmConfig(vm_id="s", kernel_path="/k", rootfs_path=None, track_dirty_pages=True)
    v1 = Version.parse("v1.0.0")
    snaps: list[Snapshot] = []
    for name, diff in (("full", False), ("diff", True)):
        work = tmp_path / f"w-{name}"
        work.mkdir()
        (work / "memory").write_bytes(os.urandom(SIZE))
        (work / "vmstate").write_bytes(b"s")
        snaps.append(
            seal_snapshot(
                work,
                tmp_path / name,
                config=config,
                version=v1,
                diff=diff,
                rootfs_jail=None,
                base=snaps[0] if diff else None,
                dirty_bytes=PAGE if diff else None,
            )
        )
    full, diff_snap = snaps
    loaded = Snapshot.load(diff_snap.path)
    assert loaded.manifest.snapshot_type == "Diff" and loaded.manifest.dirty_bytes == PAGE
    assert loaded.manifest.base is not None
    assert loaded.manifest.base.path == str(full.path)
    assert loaded.manifest.base.memory_sha256 == full.manifest.files["memory"].sha256
    assert loaded.config.track_dirty_pages
    assert Snapshot.load(full.path).manifest.base is None
