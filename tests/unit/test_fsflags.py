"""The Orlov hint (``chattr +T``) on the directories VMs' trees are made in: set on the
exec-name directory and the run root's ``vms/`` by the first VM of a process, once, and a
filesystem without the flag changes nothing."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

import pytest

from ironclaw_orchestrator import fsflags
from ironclaw_orchestrator.vm import cleanup, rundir


def _has_topdir(path: Path) -> bool:
    assert fsflags._IOCTLS is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        raw = fcntl.ioctl(fd, fsflags._IOCTLS[0], b"\0" * 8)
    finally:
        os.close(fd)
    return bool(struct.unpack("i", raw[:4])[0] & fsflags.FS_TOPDIR_FL)


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsflags, "_done", set())


@pytest.fixture
def ext_fs(tmp_path: Path) -> Path:
    probe = tmp_path / "probe"
    probe.mkdir()
    if not fsflags.spread_subdirs(str(probe)):
        pytest.skip(f"{tmp_path}'s filesystem has no FS_TOPDIR_FL (not ext2/3/4)")
    return tmp_path


def test_first_vm_marks_the_parents_and_later_ones_cost_nothing(
    ext_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work count: the flag is set by the VM that makes the directory, and a later VM of
    the process makes no ioctl (nor opens the directory for one)."""
    monkeypatch.setenv(rundir.RUN_DIR_ENV, str(ext_fs / "run"))
    (ext_fs / "base").mkdir()  # the chroot base exists; its exec-name directory not yet
    cleanup.claim_jail_dir(ext_fs / "base" / "firecracker-v1" / "vm-1", "vm-1")
    rundir.create_vm_run_dir("vm-1")
    assert _has_topdir(ext_fs / "base" / "firecracker-v1")
    assert _has_topdir(ext_fs / "run" / "vms")
    assert not _has_topdir(ext_fs / "base" / "firecracker-v1" / "vm-1")  # inside: kept close
    calls: list[object] = []
    real_ioctl = fcntl.ioctl
    monkeypatch.setattr(fcntl, "ioctl", lambda *a: calls.append(a) or real_ioctl(*a))
    cleanup.claim_jail_dir(ext_fs / "base" / "firecracker-v1" / "vm-2", "vm-2")
    rundir.create_vm_run_dir("vm-2")
    assert calls == []


def test_an_existing_directory_is_marked_once_per_process(
    ext_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chroot base made before this version (or by hand) gets the hint from the first VM
    a process starts there; were the directory replaced behind our back, only speed is lost
    (a directory we make again is marked again)."""
    exec_dir = ext_fs / "base" / "firecracker-v1"
    exec_dir.mkdir(parents=True)
    assert not _has_topdir(exec_dir)
    cleanup.claim_jail_dir(exec_dir / "vm-1", "vm-1")
    assert _has_topdir(exec_dir)
    cleanup.remove_jail_tree(exec_dir / "vm-1")
    exec_dir.rmdir()
    cleanup.claim_jail_dir(exec_dir / "vm-2", "vm-2")  # made again, by us: marked again
    assert _has_topdir(exec_dir)


@pytest.mark.parametrize("err", [errno.ENOTTY, errno.EOPNOTSUPP, errno.EPERM])
def test_a_filesystem_without_the_flag_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    def refuse(*a: object) -> None:
        raise OSError(err, "refused")

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    monkeypatch.setenv(rundir.RUN_DIR_ENV, str(tmp_path / "run"))
    assert fsflags.spread_subdirs(str(tmp_path)) is False
    (tmp_path / "base").mkdir()
    jail = cleanup.claim_jail_dir(tmp_path / "base" / "fc" / "vm-1", "vm-1")
    run_dir = rundir.create_vm_run_dir("vm-1")
    assert jail.is_dir() and run_dir.is_dir()
    assert fsflags.spread_subdirs(str(tmp_path / "missing")) is False
