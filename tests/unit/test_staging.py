"""Staging files into the jail: link only safe read-only artifacts, copy the rest, own it."""

import os
from pathlib import Path, PurePosixPath

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.staging import check_source, host_path_in, stage_file

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@root_only
def test_read_only_world_readable_is_linked_and_owner_untouched(tmp_path: Path) -> None:
    src = tmp_path / "vmlinux"
    src.write_bytes(b"kernel")
    src.chmod(0o644)
    chroot = tmp_path / "jail" / "root"
    staged = stage_file(
        src, chroot, PurePosixPath("/vmlinux"), uid=64000, gid=64000, read_only=True
    )
    assert staged.linked
    assert os.stat(staged.host_path).st_ino == os.stat(src).st_ino
    assert os.stat(src).st_uid == 0  # the user's own file is not chowned through the link


@root_only
def test_writable_disk_is_copied_and_owned_by_jail_user(tmp_path: Path) -> None:
    src = tmp_path / "rootfs.ext4"
    src.write_bytes(b"x" * 4096)
    chroot = tmp_path / "jail" / "root"
    staged = stage_file(
        src, chroot, PurePosixPath("/rootfs.ext4"), uid=64000, gid=64001, read_only=False
    )
    st = os.stat(staged.host_path)
    assert not staged.linked and st.st_ino != os.stat(src).st_ino
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (64000, 64001, 0o600)
    assert staged.host_path.read_bytes() == src.read_bytes()


@root_only
def test_private_read_only_file_is_copied(tmp_path: Path) -> None:
    src = tmp_path / "secret-kernel"
    src.write_bytes(b"k")
    src.chmod(0o600)
    staged = stage_file(
        src, tmp_path / "r", PurePosixPath("/k"), uid=64000, gid=64000, read_only=True
    )
    assert not staged.linked
    assert os.stat(staged.host_path).st_mode & 0o777 == 0o400


def test_jail_paths_cannot_escape(tmp_path: Path) -> None:
    assert host_path_in(tmp_path, PurePosixPath("/a/b")) == tmp_path / "a" / "b"
    with pytest.raises(ConfigError):
        host_path_in(tmp_path, PurePosixPath("/../etc/passwd"))


def test_check_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        check_source(tmp_path / "missing", "kernel_path")
    with pytest.raises(ConfigError, match="not a regular file"):
        check_source(tmp_path, "kernel_path")
    f = tmp_path / "ok"
    f.write_text("x")
    check_source(f, "kernel_path")
