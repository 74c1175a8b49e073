"""Snapshot directories: sealing, manifest, verification before use, sparse copies."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path, PurePosixPath

import pytest

from ironclaw_orchestrator.errors import ConfigError, VersionMismatchError
from ironclaw_orchestrator.vm.binaries import Version
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig
from ironclaw_orchestrator.vm.restore import clone_config, snapshot_files
from ironclaw_orchestrator.vm.snapshot import (
    MANIFEST,
    Snapshot,
    copy_sparse,
    seal_snapshot,
)

V1 = Version.parse("v1.0.0")


def make_snapshot(
    tmp_path: Path, *, rootfs: bool = True, name: str = "snap", jailer: JailerConfig | None = None
) -> Snapshot:
    work = tmp_path / f"work-{name}"
    work.mkdir()
    (work / "memory").write_bytes(os.urandom(64 * 1024))
    (work / "vmstate").write_bytes(b"state" * 100)
    if rootfs:
        (work / "rootfs.ext4").write_bytes(b"disk" * 1000)
    config = VmConfig(
        vm_id="src",
        kernel_path="/k",
        rootfs_path="/r" if rootfs else None,
        memory_mb=128,
        enable_networking=True,
        vsock_guest_cid=3,
        jailer=jailer,
    )
    return seal_snapshot(
        work,
        tmp_path / name,
        config=config,
        version=V1,
        diff=False,
        rootfs_jail=PurePosixPath("/rootfs.ext4") if rootfs else None,
    )


def test_seal_writes_manifest_and_read_only_files(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    assert not (tmp_path / "work-snap").exists()  # moved into place, not copied
    manifest = json.loads((snap.path / MANIFEST).read_text())
    assert manifest["firecracker_version"] == "v1.0.0"
    assert manifest["snapshot_type"] == "Full"
    assert manifest["mem_size_mib"] == 128
    assert manifest["config"]["vm_id"] == "src"
    assert manifest["files"]["memory"]["size"] == 64 * 1024
    assert len(manifest["files"]["vmstate"]["sha256"]) == 64
    assert manifest["tap"].startswith("icl") and manifest["vsock_uds_path"] == "/run/vsock.sock"
    assert manifest["rootfs_jail_path"] == "/rootfs.ext4"
    for name in ("memory", "vmstate", "rootfs.ext4", MANIFEST):
        assert stat.S_IMODE((snap.path / name).stat().st_mode) == 0o444
    assert stat.S_IMODE(snap.path.stat().st_mode) == 0o700
    loaded = Snapshot.load(snap.path, firecracker_version=V1)
    assert loaded.manifest == snap.manifest
    assert loaded.config.memory_mb == 128


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    os.chmod(snap.memory_path, 0o644)
    with open(snap.memory_path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ConfigError, match=r"memory is 1000 bytes.*truncated"):
        Snapshot.load(snap.path)


def test_altered_file_is_refused(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    os.chmod(snap.state_path, 0o644)
    with open(snap.state_path, "r+b") as f:
        f.write(b"X")
    with pytest.raises(ConfigError, match=r"vmstate has SHA-256 .*altered"):
        Snapshot.load(snap.path)


def test_missing_file_and_manifest(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    (snap.path / "rootfs.ext4").unlink()
    with pytest.raises(ConfigError, match=r"rootfs.ext4 is missing"):
        Snapshot.load(snap.path)
    (snap.path / MANIFEST).unlink()
    with pytest.raises(ConfigError, match=r"not a snapshot .*incomplete"):
        Snapshot.load(snap.path)


def test_incomplete_name_is_refused(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    partial = snap.path.with_name(".snap.incomplete-123")
    snap.path.rename(partial)
    with pytest.raises(ConfigError, match=r"incomplete"):
        Snapshot.load(partial)


def test_bad_manifest(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    manifest = snap.path / MANIFEST
    os.chmod(manifest, 0o644)
    data = json.loads(manifest.read_text())
    data["format"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"format 99"):
        Snapshot.load(snap.path)
    del data["files"]
    manifest.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"invalid: files"):
        Snapshot.load(snap.path)
    manifest.write_text("{not json")
    with pytest.raises(ConfigError, match=r"unreadable"):
        Snapshot.load(snap.path)


def test_version_mismatch(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    with pytest.raises(VersionMismatchError, match=r"written by Firecracker v1.0.0.*v1.14.1"):
        Snapshot.load(snap.path, firecracker_version=Version.parse("v1.14.1"))


def test_change_after_verification_is_refused(tmp_path: Path) -> None:
    snap = Snapshot.load(make_snapshot(tmp_path).path)
    snap.check_unchanged()
    os.chmod(snap.memory_path, 0o644)
    with open(snap.memory_path, "r+b") as f:
        f.write(b"evil")
    with pytest.raises(ConfigError, match=r"memory changed after it was verified"):
        snap.check_unchanged()


def test_unverified_snapshot_is_refused(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    bare = Snapshot(snap.path, snap.manifest)
    with pytest.raises(ConfigError, match=r"not verified"):
        bare.check_unchanged()


def test_copy_sparse_keeps_holes_and_content(tmp_path: Path) -> None:
    src = tmp_path / "sparse.img"
    with open(src, "wb") as f:
        f.seek(8 << 20)
        f.write(b"middle")
        f.truncate(32 << 20)
    dest = tmp_path / "copy.img"
    seen: list[tuple[str, int, int]] = []
    copy_sparse(src, dest, lambda *a: seen.append(a))
    assert dest.stat().st_size == 32 << 20
    with open(dest, "rb") as f:
        f.seek(8 << 20)
        assert f.read(6) == b"middle"
    assert dest.stat().st_blocks * 512 < 4 << 20  # holes stayed holes (or a reflink)
    assert seen and seen[-1][0] == "copy"
    with pytest.raises(FileExistsError):
        copy_sparse(src, dest)


def test_clone_config_keeps_guest_and_drops_source_jail_id(tmp_path: Path) -> None:
    snap = make_snapshot(tmp_path)
    cfg = clone_config(snap, "clone-1")
    assert cfg.vm_id == "clone-1" and cfg.memory_mb == 128 and cfg.enable_networking
    assert cfg.jailer_config().jailer_id == "clone-1"
    files = snapshot_files(snap, cfg)
    # All in the jail's root: staging makes no directory per restore (nor removes one).
    assert [(str(f.jail_path), f.read_only) for f in files] == [
        ("/memory", True),
        ("/vmstate", True),
        ("/rootfs.ext4", False),  # each clone writes its own copy
    ]
    assert all(f.jail_path.parent == PurePosixPath("/") for f in files)


def test_clone_configs_are_validated_once_per_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ironclaw_orchestrator.vm import restore

    built: list[str] = []
    real = restore._clone_config

    def counting(src: VmConfig, vm_id: str, jailer: object) -> VmConfig:
        built.append(vm_id)
        return real(src, vm_id, jailer)  # type: ignore[arg-type]

    monkeypatch.setattr(restore, "_clone_config", counting)
    snap = make_snapshot(tmp_path, name="jailed", jailer=JailerConfig(cpu_limit=2.0))
    first = clone_config(snap, "clone-1")
    second = clone_config(snap, "clone-2")
    assert built == ["src"]  # the template, once; each clone is a copy with its own id
    fresh = real(snap.config, "clone-2", None)
    assert second.model_dump() == fresh.model_dump()
    assert second.model_fields_set == fresh.model_fields_set
    assert second.jailer_config() == fresh.jailer_config()
    # Clones share no mutable state with each other or the template.
    assert first.jailer is not None and second.jailer is not None
    assert first.jailer is not second.jailer
    first.jailer.cpu_limit = 1.5
    first.memory_headroom_mb = 96
    third = clone_config(snap, "clone-3")
    assert third.jailer is not None and third.jailer.cpu_limit == 2.0
    assert third.memory_headroom_mb == fresh.memory_headroom_mb
    assert snap.config.vm_id == "src" and snap.config is not snap.config
    # A bad id is refused as by the full validation, naming the key.
    with pytest.raises(ConfigError, match="vm_id"):
        clone_config(snap, "bad/id")
    # An explicit jail config is not the cached template's.
    own = clone_config(snap, "clone-4", JailerConfig(cpu_limit=3.0))
    assert own.jailer is not None and own.jailer.cpu_limit == 3.0
    assert built == ["src", "bad/id", "clone-4"]


def test_manifest_keeps_only_chosen_jail_settings(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / "memory").write_bytes(b"m")
    (work / "vmstate").write_bytes(b"s")
    config = VmConfig(
        vm_id="s", kernel_path="/k", rootfs_path=None, jailer=JailerConfig(cpu_limit=2.0)
    )
    snap = seal_snapshot(
        work, tmp_path / "s", config=config, version=V1, diff=False, rootfs_jail=None
    )
    assert snap.manifest.config["jailer"] == {"cpu_limit": 2.0}
    cfg = clone_config(snap, "c")
    assert cfg.jailer is not None and cfg.jailer.model_fields_set == {"cpu_limit"}


def _age(snap_dir: Path, seconds: float = 10.0) -> None:
    """Make the files look written ``seconds`` ago (verification trusts only settled files)."""
    then = time.time() - seconds
    for f in snap_dir.iterdir():
        os.utime(f, (then, then))


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    from ironclaw_orchestrator.vm import snapshot_dir as snapshot_mod

    hashed: list[Path] = []
    real = snapshot_mod.sha256_file

    def counting(path: Path, *args: object) -> str:
        hashed.append(path)
        return real(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot_mod, "sha256_file", counting)
    return hashed


def test_a_verified_snapshot_is_not_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = make_snapshot(tmp_path)
    _age(snap.path)
    hashed = _count_hashing(monkeypatch)
    first = Snapshot.load(snap.path)
    assert len(hashed) == 3  # memory, vmstate, rootfs
    again = Snapshot.load(tmp_path / "snap")
    assert len(hashed) == 3 and again.manifest == first.manifest
    assert again.fingerprints == first.fingerprints
    again.check_unchanged()


@pytest.mark.parametrize("change", ["rewrite", "replace", "group_writable_dir", "fresh"])
def test_a_changed_snapshot_is_verified_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    snap = make_snapshot(tmp_path)
    # "fresh": written just now (dated a second ahead, so that a slow host cannot age it
    # past the margin before the load), so never trusted without hashing.
    _age(snap.path, -1.0 if change == "fresh" else 10.0)
    hashed = _count_hashing(monkeypatch)
    Snapshot.load(snap.path)
    hashed.clear()
    state = snap.path / "vmstate"
    if change == "rewrite":  # same size, new content
        os.chmod(state, 0o644)
        state.write_bytes(b"STATE" * 100)
        os.chmod(state, 0o444)
    elif change == "replace":  # same content, another inode
        data = state.read_bytes()
        state.unlink()
        state.write_bytes(data)
        os.chmod(state, 0o444)
    elif change == "group_writable_dir":
        os.chmod(snap.path, 0o770)
    if change == "rewrite":
        with pytest.raises(ConfigError, match="altered"):
            Snapshot.load(snap.path)
    else:
        Snapshot.load(snap.path)
    assert hashed, "the snapshot should have been hashed again"


def test_loads_of_one_verified_directory_share_the_clone_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``restore_snapshot("dir")`` loads the directory per restore: the clone config is
    still validated once per directory (while the verification is trusted), not per load."""
    from ironclaw_orchestrator.vm import restore

    snap = make_snapshot(tmp_path, jailer=JailerConfig(cpu_limit=2.0))
    _age(snap.path)
    built: list[str] = []
    real = restore._clone_config

    def counting(src: VmConfig, vm_id: str, jailer: object) -> VmConfig:
        built.append(vm_id)
        return real(src, vm_id, jailer)  # type: ignore[arg-type]

    monkeypatch.setattr(restore, "_clone_config", counting)
    first = Snapshot.load(snap.path)
    a = clone_config(first, "a")
    b = clone_config(Snapshot.load(snap.path), "b")
    assert built == ["src"] and (a.vm_id, b.vm_id) == ("a", "b")
    os.chmod(snap.path, 0o770)  # no longer trusted: verified again, derived anew
    clone_config(Snapshot.load(snap.path), "c")
    assert built == ["src", "src"]
