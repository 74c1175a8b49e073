"""vm/staging.py decisions (confinement, source checks, link-or-copy rule), edge by edge."""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.staging import (
    IMAGE_DIRS_ENV,
    check_source,
    confine,
    effective_image_dirs,
    host_path_in,
    image_dirs_from_env,
    linkable,
)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(IMAGE_DIRS_ENV, raising=False)


def test_env_list_skips_empty_entries_and_blanks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGE_DIRS_ENV, " /srv/a::/srv/b: ")
    assert image_dirs_from_env() == (Path("/srv/a"), Path("/srv/b"))
    monkeypatch.setenv(IMAGE_DIRS_ENV, "")
    assert image_dirs_from_env() is None
    monkeypatch.delenv(IMAGE_DIRS_ENV)
    assert image_dirs_from_env() is None


@pytest.mark.parametrize("entry", ["relative/dir", "/srv/a\x1bb", "/srv/\x01"])
def test_env_entry_refused_with_message(entry: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGE_DIRS_ENV, f"/srv/ok:{entry}")
    with pytest.raises(ConfigError) as info:
        image_dirs_from_env()
    assert str(info.value) == (
        f"IRONCLAW_IMAGE_DIRS entry {entry!r} must be an absolute directory (colon-separated "
        "list such as /srv/images:/var/lib/ironclaw/images)"
    )


def test_env_entry_with_space_and_tilde_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGE_DIRS_ENV, "/srv/my images~")
    assert image_dirs_from_env() == (Path("/srv/my images~"),)


def test_configured_dirs_win_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGE_DIRS_ENV, "/from/env")
    assert effective_image_dirs([Path("/cfg")]) == (Path("/cfg"),)
    assert effective_image_dirs(None) == (Path("/from/env"),)


def test_confine_message_lists_every_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    f = tmp_path / "k"
    f.write_text("x")
    with pytest.raises(ConfigError) as info:
        confine(f, "kernel_path", [tmp_path / "a", Path("/srv/b")])
    assert str(info.value) == (
        f"kernel_path {f} resolves to {f}, outside the image directories {tmp_path / 'a'}:/srv/b "
        "(image_dirs / IRONCLAW_IMAGE_DIRS): move the image into one of them, or add its "
        "directory to image_dirs"
    )


def test_confine_edges(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "images2").mkdir()
    sibling = tmp_path / "images2" / "k"
    sibling.write_text("x")
    # A sibling whose name merely starts with the directory's is outside.
    with pytest.raises(ConfigError, match="outside"):
        confine(sibling, "kernel_path", [images])
    # The allowed path itself, and anything below it, are inside; the result is resolved.
    kernel = images / "k"
    kernel.write_text("x")
    assert confine(kernel, "kernel_path", [kernel]) == kernel
    (tmp_path / "link").symlink_to(kernel)
    assert confine(tmp_path / "link", "kernel_path", [images]) == kernel
    assert confine(tmp_path / "link", "kernel_path", None) == kernel
    # The second directory counts as much as the first.
    assert confine(sibling, "kernel_path", [images, tmp_path / "images2"]) == sibling


def test_check_source_messages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check_source(tmp_path / "missing", "kernel_path")
    assert str(info.value) == f"kernel_path {tmp_path / 'missing'} does not exist: check the path"
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError) as info:
        check_source(f / "below", "rootfs_path")
    assert str(info.value) == f"rootfs_path {f / 'below'} cannot be read: Not a directory"
    with pytest.raises(ConfigError) as info:
        check_source(tmp_path, "rootfs_path")
    assert str(info.value) == (
        f"rootfs_path {tmp_path} is not a regular file: point it at an image file"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_check_source_unreadable(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_text("x")
    f.chmod(0)
    with pytest.raises(ConfigError) as info:
        check_source(f, "kernel_path")
    assert str(info.value) == f"kernel_path {f} is not readable by us: fix its permissions"


def test_check_source_confines(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_text("x")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ConfigError, match=r"^kernel_path .* outside the image directories"):
        check_source(f, "kernel_path", [tmp_path / "imgs"])


def test_host_path_in_edges(tmp_path: Path) -> None:
    assert host_path_in(tmp_path, PurePosixPath("/")) == tmp_path
    assert host_path_in(tmp_path, PurePosixPath("/run/v.sock")) == tmp_path / "run" / "v.sock"
    with pytest.raises(ConfigError) as info:
        host_path_in(tmp_path, PurePosixPath("/a/../b"))
    assert str(info.value) == "jail path /a/../b must not contain '..'"


def _st(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "ok"),
    [
        (stat.S_IFREG | 0o755, 0, True),
        (stat.S_IFREG | 0o404, 0, True),
        (stat.S_IFREG | 0o640, 0, False),  # not world-readable
        (stat.S_IFREG | 0o602, 0, False),  # world-writable
        (stat.S_IFREG | 0o624, 0, False),  # group-writable
        (stat.S_IFREG | 0o4644, 0, False),  # set-uid
        (stat.S_IFREG | 0o2644, 0, False),  # set-gid
        (stat.S_IFREG | 0o644, 64000, False),  # not root's
        (stat.S_IFDIR | 0o755, 0, False),
        (stat.S_IFREG | 0o1644, 0, True),  # sticky means nothing on a file
    ],
)
def test_linkable_each_bit(mode: int, uid: int, ok: bool) -> None:
    assert linkable(_st(mode, uid)) is ok
