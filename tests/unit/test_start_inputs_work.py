"""Work before the jailer is spawned, counted (never timed), and each host-fact cache's
invalidation (issue 10): the input check and the start derive the exec file's name, the
jail paths and the checked sources once per start; where firecracker is on PATH, the
host's RAM and the swap state are not recomputed in Python per VM, yet follow the host.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator import names, safefs
from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm import (
    binaries,
    hostcheck,
)


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


# --------------------------------------------------------------------------- PATH


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Three PATH directories; firecracker in the last one; shutil.which counted."""
    dirs = [tmp_path / n for n in ("a", "b", "c")]
    for d in dirs:
        d.mkdir()
    exe(dirs[2] / "firecracker")
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, dirs)))
    monkeypatch.delenv(binaries.FIRECRACKER_ENV, raising=False)
    monkeypatch.setattr(binaries, "_on_path", {})
    return dirs


def exe(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\n")
    path.chmod(mode)
    return path


def test_path_is_scanned_once_until_what_it_found_changes(
    on_path: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = on_path[2]
    scans = counting(monkeypatch, shutil, "which")
    assert binaries.find_firecracker() == c / "firecracker" and len(scans) == 1
    for _ in range(3):
        assert binaries.find_firecracker() == c / "firecracker"
    assert len(scans) == 1  # one stat per PATH entry looked at, no scan
    # Replaced (a new inode, as an install does): scanned again, same answer.
    (c / "firecracker").unlink()
    exe(c / "firecracker")
    assert binaries.find_firecracker() == c / "firecracker" and len(scans) == 2
    # Made non-executable: the scan finds nothing, and then the default decides.
    (c / "firecracker").chmod(0o644)
    monkeypatch.setattr(binaries, "DEFAULT_EXEC_FILE", Path("/nonexistent/fc"))
    with pytest.raises(binaries.BinaryNotFoundError):
        binaries.find_firecracker()
    (c / "firecracker").chmod(0o755)
    assert binaries.find_firecracker() == c / "firecracker"


def test_a_binary_appearing_earlier_on_path_is_found(
    on_path: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = on_path
    assert binaries.find_firecracker() == c / "firecracker"
    exe(b / "firecracker")  # installed earlier on PATH
    assert binaries.find_firecracker() == b / "firecracker"
    exe(a / "firecracker", 0o644)  # there, but not executable: which skips it ...
    assert binaries.find_firecracker() == b / "firecracker"
    (a / "firecracker").chmod(0o755)  # ... until it is (the directory did not change)
    assert binaries.find_firecracker() == a / "firecracker"
    (a / "firecracker").unlink()
    (b / "firecracker").unlink()
    assert binaries.find_firecracker() == c / "firecracker"


def test_another_path_or_a_relative_entry_scans_again(
    on_path: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    a, b, c = on_path
    scans = counting(monkeypatch, shutil, "which")
    binaries.find_firecracker()
    monkeypatch.setenv("PATH", f"{b}{os.pathsep}{c}")
    assert binaries.find_firecracker() == c / "firecracker" and len(scans) == 2
    binaries.find_firecracker()
    assert len(scans) == 2
    # A relative entry depends on the current directory: never remembered.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"a{os.pathsep}{c}")
    for _ in range(2):
        assert binaries.find_firecracker() == c / "firecracker"
    assert len(scans) == 4
    exe(a / "firecracker")
    assert binaries.find_firecracker() == Path("a/firecracker")


# --------------------------------------------------------------------------- RAM, swap


def test_memtotal_is_read_again_only_when_the_kernel_ram_changes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(hostcheck, "_mem_total", {})
    reads = counting(monkeypatch, Path, "read_text")
    pages = [1000]
    monkeypatch.setattr(hostcheck, "_ram_pages", lambda: pages[0])
    total = hostcheck.host_memory_mib()
    assert total is not None and total > 0
    for _ in range(3):
        assert hostcheck.host_memory_mib() == total
        hostcheck.check_guest_memory(128)
    assert reads == [hostcheck.MEMINFO_PATH]  # read once: RAM unchanged
    pages[0] = 2000  # memory hot-plugged
    assert hostcheck.host_memory_mib() == total and len(reads) == 2
    # The message still names MemTotal and the file; a file given is always read.
    with pytest.raises(ConfigError, match=r"MemTotal in /proc/meminfo"):
        hostcheck.check_guest_memory(total + 1)
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:        2048000 kB\n")
    assert hostcheck.host_memory_mib(fake) == 2000
    fake.write_text("MemTotal:        1024000 kB\n")
    assert hostcheck.host_memory_mib(fake) == 1000


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
