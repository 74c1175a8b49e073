"""Host facts are detected once per process and re-read when they change (never timed)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ironclaw_orchestrator.vm import binaries as binaries_mod
from ironclaw_orchestrator.vm.binaries import find_firecracker, find_jailer, read_version
from ironclaw_orchestrator.vm.cgroups import layout
from ironclaw_orchestrator.vm.config import JailerConfig
from ironclaw_orchestrator.vm.jailer import resolve_binaries

pytestmark = pytest.mark.integration


def test_cgroup_layout_is_parsed_again_only_after_a_mount_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs (to change the mount table) needs root")
    parsed: list[int] = []
    real = layout._from_mountinfo

    def counting(text: str) -> tuple[object, ...]:
        parsed.append(1)
        return real(text)

    monkeypatch.setattr(layout, "_from_mountinfo", counting)
    layout.detect_layout()  # may parse (first use, or the table changed since)
    parsed.clear()
    first = layout.detect_layout()
    assert layout.detect_layout() == first
    assert parsed == []  # unchanged mount table: no parsing
    target = tmp_path / "mnt"
    target.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"none", str(target).encode(), b"tmpfs", 0, None) != 0:
        pytest.skip(f"cannot mount a tmpfs here: {os.strerror(ctypes.get_errno())}")
    try:
        assert layout.detect_layout() == first  # same cgroups, but re-read
        assert parsed == [1]
        layout.detect_layout()
        assert parsed == [1]
    finally:
        libc.umount2(str(target).encode(), 2)  # MNT_DETACH


def test_binary_pair_is_checked_once_and_again_when_a_binary_changes(
    real_host: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fc = tmp_path / "firecracker"
    shutil.copy2(find_firecracker().resolve(), fc)
    jl = tmp_path / "jailer"
    shutil.copy2(find_jailer().resolve(), jl)
    runs: list[str] = []
    real_run = subprocess.run

    def counting_run(argv: list[str], *args: object, **kwargs: object) -> object:
        runs.append(Path(argv[0]).name)
        return real_run(argv, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(subprocess, "run", counting_run)
    checks: list[int] = []
    real_check = binaries_mod.check_pair

    def counting_check(*args: Path) -> object:
        checks.append(1)
        return real_check(*args)

    monkeypatch.setattr(binaries_mod, "check_pair", counting_check)
    cfg = JailerConfig(jailer_binary=jl, exec_file=fc)
    first = resolve_binaries(cfg)
    assert sorted(runs) == ["firecracker", "jailer"]
    for _ in range(3):
        assert resolve_binaries(cfg) == first
    assert len(runs) == 2 and len(checks) == 1  # cached: no `--version` run, no lookup
    # Replace firecracker with another file (new inode and mtime): checked again.
    replacement = tmp_path / "firecracker.new"
    shutil.copy2(find_firecracker().resolve(), replacement)
    os.utime(replacement, ns=(1, 1))
    replacement.replace(fc)
    assert resolve_binaries(cfg) == first
    assert runs[2:] == ["firecracker"] and len(checks) == 2
    assert read_version(fc, "firecracker") == first.version
