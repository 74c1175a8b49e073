"""Staging files into the jail: link only safe read-only artifacts, copy the rest, own it."""

import os
import stat
from pathlib import Path, PurePosixPath

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.staging import (
    IMAGE_DIRS_ENV,
    StagedFile,
    check_source,
    host_path_in,
    image_dirs_from_env,
    linkable,
    stage_file,
)

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
def test_sparse_disk_stays_sparse_in_the_jail(tmp_path: Path) -> None:
    src = tmp_path / "rootfs.ext4"
    with open(src, "wb") as f:  # 64 MiB disk with 8 KiB of data in two places
        f.write(b"head" * 1024)
        f.seek(40 << 20)
        f.write(b"tail" * 1024)
        f.truncate(64 << 20)
    staged = stage_file(
        src, tmp_path / "jail" / "root", PurePosixPath("/rootfs.ext4"),
        uid=64000, gid=64000, read_only=False,
    )  # fmt: skip
    copy = staged.host_path
    assert copy.stat().st_size == 64 << 20
    assert copy.stat().st_blocks * 512 < 4 << 20  # holes stayed holes (or a reflink)
    with open(copy, "rb") as f:
        assert f.read(4096) == b"head" * 1024
        f.seek(40 << 20)
        assert f.read(4096) == b"tail" * 1024
        f.seek(20 << 20)
        assert f.read(4096) == bytes(4096)


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


def _stage(src: Path, tmp_path: Path, **kwargs: object) -> StagedFile:
    chroot = tmp_path / "jail" / "root"
    return stage_file(
        src, chroot, PurePosixPath("/vmlinux"), uid=64000, gid=64000, read_only=True, **kwargs
    )  # type: ignore[arg-type]


@root_only
@pytest.mark.parametrize(
    ("mode", "owner"),
    [
        (0o666, 0),  # world-writable: the jailed VMM could rewrite the host's file
        (0o664, 0),  # group-writable
        (0o4755, 0),  # set-uid
        (0o644, 1000),  # owned by a user, who could change it under the VM
        (0o640, 0),  # not world-readable: the jail user could not read a link
    ],
    ids=["0666", "0664", "setuid", "user-owned", "private"],
)
def test_files_others_can_change_are_copied_not_linked(
    tmp_path: Path, mode: int, owner: int
) -> None:
    src = tmp_path / "vmlinux"
    src.write_bytes(b"kernel")
    os.chown(src, owner, owner)
    src.chmod(mode)
    staged = _stage(src, tmp_path)
    st = os.stat(staged.host_path)
    assert not staged.linked and st.st_ino != os.stat(src).st_ino
    assert (st.st_uid, st.st_mode & 0o7777) == (64000, 0o400)
    assert os.stat(src).st_mode & 0o7777 == mode and os.stat(src).st_uid == owner


def test_linkable_rule() -> None:
    def st(mode: int, uid: int = 0) -> os.stat_result:
        return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))

    assert linkable(st(stat.S_IFREG | 0o644))
    assert linkable(st(stat.S_IFREG | 0o444))
    assert not linkable(st(stat.S_IFREG | 0o646))
    assert not linkable(st(stat.S_IFREG | 0o664))
    assert not linkable(st(stat.S_IFREG | 0o644, uid=1))
    assert not linkable(st(stat.S_IFREG | 0o2644))
    assert not linkable(st(stat.S_IFLNK | 0o777))


@root_only
def test_symlink_is_staged_as_its_target(tmp_path: Path) -> None:
    target = tmp_path / "real-kernel"
    target.write_bytes(b"kernel")
    target.chmod(0o644)
    link = tmp_path / "vmlinux"
    link.symlink_to(target)
    staged = _stage(link, tmp_path)
    assert staged.linked and os.stat(staged.host_path).st_ino == os.stat(target).st_ino
    assert not os.path.islink(staged.host_path)


def test_image_dirs_confine_after_resolving_symlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(IMAGE_DIRS_ENV, raising=False)
    images = tmp_path / "images"
    images.mkdir()
    inside = images / "vmlinux"
    inside.write_bytes(b"k")
    escape = images / "rootfs.ext4"
    escape.symlink_to("/etc/passwd")
    check_source(inside, "kernel_path", [images])
    check_source(escape, "rootfs_path")  # no confinement configured: allowed
    with pytest.raises(ConfigError, match=r"rootfs_path .* resolves to /etc/passwd, outside"):
        check_source(escape, "rootfs_path", [images])
    with pytest.raises(ConfigError, match="outside the image directories"):
        _stage(escape, tmp_path, image_dirs=[images])
    assert not (tmp_path / "jail").exists()  # refused before anything was made
    # The environment variable applies when the config sets nothing ...
    monkeypatch.setenv(IMAGE_DIRS_ENV, f"/nonexistent:{images}")
    check_source(inside, "kernel_path")
    with pytest.raises(ConfigError, match=IMAGE_DIRS_ENV):
        check_source(escape, "rootfs_path")
    # ... and the config wins over it.
    check_source(escape, "rootfs_path", [Path("/etc")])
    # A directory given through a symlink is resolved too.
    (tmp_path / "images-link").symlink_to(images)
    check_source(inside, "kernel_path", [tmp_path / "images-link"])


def test_image_dirs_env_must_be_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGE_DIRS_ENV, "/srv/images:relative")
    with pytest.raises(ConfigError, match="IRONCLAW_IMAGE_DIRS entry 'relative'"):
        image_dirs_from_env()
    monkeypatch.setenv(IMAGE_DIRS_ENV, "  ")
    assert image_dirs_from_env() is None
