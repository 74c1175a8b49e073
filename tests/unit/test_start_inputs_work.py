"""Work before the jailer is spawned, counted (never timed), and each host-fact cache's
invalidation (issue 10): the input check and the start derive the exec file's name, the
jail paths and the checked sources once per start; where firecracker is on PATH, the
host's RAM and the swap state are not recomputed in Python per VM, yet follow the host.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from counting import counting
from standin_host import StandinHost, make_host

from ironclaw_orchestrator import names, safefs
from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import (
    binaries,
    hostcheck,
    inputs,
    jailer,
    jailer_config,
    start_firecracker,
)
from ironclaw_orchestrator.vm import config as vm_config
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig

# --------------------------------------------------------------------------- per start


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    monkeypatch.delenv("IRONCLAW_REQUIRE_SANDBOX", raising=False)
    yield from make_host(monkeypatch, 1)


async def test_a_start_resolves_the_exec_file_and_checks_each_source_once(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root or not, the start derives the name once: by the input check (root), handed on to
    # the start, or else by the start itself.
    resolved = counting(monkeypatch, jailer_config, "real_path")
    checked = counting(monkeypatch, inputs, "check_source")
    monkeypatch.setattr(jailer, "check_source", inputs.check_source)  # the same counter
    copies = counting(monkeypatch, JailerConfig, "model_copy")
    vm = await start_firecracker(host.vm_config(), registry=Registry(host.root / "state"))
    try:
        assert resolved == [host.bin / "firecracker"]
        # kernel and rootfs, each once (staging confines and opens them regardless)
        assert sorted(map(str, checked)) == [
            str(host.images / "rootfs.ext4"),
            str(host.images / "vmlinux"),
        ]
        # jailer_config(), the input check's, the start's private one, the own uid/gid
        assert len(copies) <= 4, copies
        assert vm.vmm.config.jail_dir == host.jail()
    finally:
        await vm.stop()


async def test_a_bad_source_is_still_refused_when_the_jailer_is_started_directly(
    host: StandinHost,
) -> None:
    missing = host.images / "missing"
    with pytest.raises(ConfigError, match="does not exist"):
        await jailer.start_with_jailer(
            host.jailer_config(), files=[jailer.JailFile(missing, jailer.PurePosixPath("/k"))]
        )
    assert host.made() == []


def test_with_exec_file_resolves_once_per_start_and_never_carries_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fc-v1").touch()
    (tmp_path / "fc-v2").touch()
    link = tmp_path / "firecracker"
    link.symlink_to("fc-v1")
    resolved = counting(monkeypatch, jailer_config, "real_path")
    base = JailerConfig(jailer_id="a", chroot_base_dir=tmp_path / "jail")
    checked = base.with_exec_file(link)
    assert checked.jail_dir == tmp_path / "jail/fc-v1/a" and len(resolved) == 1
    started = checked.model_copy(update={"uid": 4242}).with_exec_file(link)
    assert started is not checked  # a private copy: the caller's object stays the caller's
    assert started.api_socket_path == tmp_path / "jail/fc-v1/a/root/run/firecracker.socket"
    assert len(resolved) == 1  # handed on, not resolved again
    assert started.exec_file == link and "exec_file" in started.model_fields_set
    assert started == base.model_copy(update={"exec_file": link, "uid": 4242})
    # An upgrade re-points the link: the next start (a fresh jailer_config) sees it ...
    link.unlink()
    link.symlink_to("fc-v2")
    again = VmConfig(vm_id="a", kernel_path="/k", jailer=started).jailer_config()
    assert again.with_exec_file(link).jail_dir == tmp_path / "jail/fc-v2/a"
    # ... as does a copy for another file, or one whose exec_file is set.
    assert started.with_exec_file(tmp_path / "fc-v1").exec_file_name == "fc-v1"
    started.exec_file = link
    assert started.with_exec_file(link).exec_file_name == "fc-v2"
    # The running VM's own object keeps the name it started with.
    assert checked.exec_file_name == "fc-v1"
    # A caller's object that cached a name itself is no start's: resolved anew.
    mine = JailerConfig(jailer_id="b", chroot_base_dir=tmp_path / "jail", exec_file=link)
    assert mine.exec_file_name == "fc-v2"
    link.unlink()
    link.symlink_to("fc-v1")
    assert mine.with_exec_file(link).jail_dir == tmp_path / "jail/fc-v1/b"


def test_vms_without_a_jailer_table_share_one_validated_default_never_changed() -> None:
    a = VmConfig(vm_id="a", kernel_path="/k").jailer_config()
    b = VmConfig(vm_id="b", kernel_path="/k", memory_mb=512).jailer_config()
    a.uid = 4242
    a.exec_file = Path("/opt/fc")
    assert (a.jailer_id, b.jailer_id, b.uid, b.memory_limit_mb) == ("a", "b", 64_000, 576)
    assert JailerConfig() == vm_config._DEFAULT_JAILER
    assert vm_config._DEFAULT_JAILER.model_fields_set == set()
    assert "jail_dir" not in vm_config._DEFAULT_JAILER.__dict__


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
