"""Work before the jailer is spawned, counted (never timed), and each host-fact cache's
invalidation (issue 10): the input check and the start derive the exec file's name, the
jail paths and the checked sources once per start; where firecracker is on PATH, the
host's RAM and the swap state are not recomputed in Python per VM, yet follow the host.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator import names, safefs


def counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[object]:
    """Count calls of ``owner.name`` (its first argument each)."""
    calls: list[object] = []
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


# --------------------------------------------------------------------------- realpath


def test_real_path_is_realpath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "d/e").mkdir(parents=True)
    (tmp_path / "d/e/f").write_text("x")
    (tmp_path / "l1").symlink_to("d/e/f")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    (tmp_path / "ld").symlink_to("d")
    (tmp_path / "dangling").symlink_to("nowhere/at/all")
    (tmp_path / "loop").symlink_to("loop")
    monkeypatch.chdir(tmp_path / "d")
    cases = [
        tmp_path / "l2", tmp_path / "ld/e/../e/f", tmp_path / "ld/e/", "e/f", "../l1", ".",
        tmp_path / "missing/x", tmp_path / "dangling", tmp_path / "loop", tmp_path / "ld",
        "/", "//", "/proc/self", "/dev/null", "",
    ]  # fmt: skip
    for case in cases:
        assert names.real_path(case) == os.path.realpath(case), case
    assert names.exec_file_name(tmp_path / "l2") == "f"


def test_real_path_of_a_file_unlinked_while_open_is_realpath(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "gone"
    target.touch()
    real_readlink = os.readlink

    def unlink_first(path: Any, *a: Any, **kw: Any) -> str:
        if str(path).startswith("/proc/self/fd/") and target.exists():
            target.unlink()  # between the O_PATH open and the read of its name
        return real_readlink(path, *a, **kw)

    monkeypatch.setattr(os, "readlink", unlink_first)
    assert names.real_path(target) == str(target)  # not ".../gone (deleted)"


# --------------------------------------------------------------------------- RAM, swap


def test_swappable_reason_stats_each_directory_above_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / "x/y"
    deep.mkdir(parents=True)
    deep.chmod(0o755)
    stats = counting(monkeypatch, os, "stat")
    assert safefs.swappable_reason(deep) is None
    assert stats == [str(p) for p in deep.parents]
    # Still decided by what is there now, each time.
    (tmp_path / "x").chmod(0o777)
    assert "x above it is writable" in (safefs.swappable_reason(deep) or "")
    (tmp_path / "x").chmod(0o1777)
    assert safefs.swappable_reason(deep) is None
    assert safefs.swappable_reason(Path("/"), must_exist=False) is None
    assert safefs.swappable_reason(Path("//"), must_exist=False) is None
