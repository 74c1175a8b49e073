"""safefs.replace_file: os.replace's contract (readers see old or new, whole) without the flush."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from ironclaw_orchestrator import safefs


def test_replaces_an_existing_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    dst = tmp_path / "rec.json"
    dst.write_text("old")
    src = tmp_path / ".rec.json.tmp"
    src.write_text("new")
    safefs.replace_file(src, dst)
    assert dst.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.json"]


def test_creates_the_target_when_missing(tmp_path: Path) -> None:
    src = tmp_path / "a.tmp"
    src.write_text("x")
    safefs.replace_file(src, tmp_path / "a")
    assert (tmp_path / "a").read_text() == "x"
    assert not src.exists()


def test_missing_source_raises_and_keeps_the_target(tmp_path: Path) -> None:
    dst = tmp_path / "a"
    dst.write_text("keep")
    with pytest.raises(FileNotFoundError):
        safefs.replace_file(tmp_path / "nope", dst)
    assert dst.read_text() == "keep"


def test_a_directory_target_is_refused_and_both_stay(tmp_path: Path) -> None:
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / "inside").write_text("i")
    src = tmp_path / "f.tmp"
    src.write_text("f")
    with pytest.raises(IsADirectoryError):
        safefs.replace_file(src, dst)
    assert (dst / "inside").read_text() == "i"
    assert src.read_text() == "f"


class _NoExchange:
    """A libc whose renameat2 fails as on a filesystem without RENAME_EXCHANGE."""

    def __init__(self, err: int) -> None:
        self.err = err
        self.calls = 0

    def renameat2(self, *args: object) -> int:
        self.calls += 1
        ctypes.set_errno(self.err)
        return -1


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_falls_back_to_os_replace_where_swapping_is_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    fake = _NoExchange(err)
    monkeypatch.setattr(safefs, "libc", lambda: fake)
    dst = tmp_path / "a"
    dst.write_text("old")
    src = tmp_path / "a.tmp"
    src.write_text("new")
    safefs.replace_file(src, dst)
    assert fake.calls == 1
    assert dst.read_text() == "new"
    assert not src.exists()


def test_other_errors_are_raised_with_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(safefs, "libc", lambda: _NoExchange(errno.EXDEV))
    with pytest.raises(OSError) as info:
        safefs.replace_file(tmp_path / "a", tmp_path / "b")
    assert info.value.errno == errno.EXDEV
    assert info.value.filename == str(tmp_path / "a")
    assert info.value.filename2 == str(tmp_path / "b")


def test_the_swap_never_exposes_a_missing_target(tmp_path: Path) -> None:
    # The old contents move to the source name; the target always names a whole file.
    dst = tmp_path / "a"
    dst.write_text("v0")
    for i in range(1, 20):
        src = tmp_path / f"a.{i}.tmp"
        src.write_text(f"v{i}")
        safefs.replace_file(src, dst)
        assert os.path.exists(dst)
        assert dst.read_text() == f"v{i}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
