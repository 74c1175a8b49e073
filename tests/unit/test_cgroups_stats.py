"""Stats parsing (absent files -> None) and the disk device lookup, on fake trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import CgroupError
from ironclaw_orchestrator.vm.cgroups import CgroupFs, CgroupStats, IoStat, whole_disk
from ironclaw_orchestrator.vm.cgroups.stats import read_stats


def write(d: Path, files: dict[str, str]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


def test_v2_full(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"
            "nr_periods 10\nnr_throttled 2\nthrottled_usec 300\n",
            "memory.current": "4096\n",
            "memory.peak": "8192\n",
            "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
            "io.stat": "254:0 rbytes=100 wbytes=200 rios=1 wios=2 dbytes=0 dios=0\n",
            "pids.current": "3\n",
        },
    )
    st = read_stats(CgroupFs(), 2, {"unified": tmp_path})
    assert st == CgroupStats(
        cpu_usage_ns=1_500_000,
        nr_periods=10,
        nr_throttled=2,
        throttled_ns=300_000,
        memory_current_bytes=4096,
        memory_peak_bytes=8192,
        oom_kills=1,
        io={"254:0": IoStat(100, 200, 1, 2)},
        pids_current=3,
    )


def test_v2_sparse_is_none_not_zero(tmp_path: Path) -> None:
    # cpu controller not enabled: cpu.stat has only usage; no memory.peak, io, pids.
    write(tmp_path, {"cpu.stat": "usage_usec 7\n", "memory.current": "1\n"})
    st = read_stats(CgroupFs(), 2, {"unified": tmp_path})
    assert st.cpu_usage_ns == 7000
    assert st.nr_periods is None and st.throttled_ns is None
    assert st.memory_peak_bytes is None
    assert st.oom_kills is None
    assert st.io is None
    assert st.pids_current is None


def test_v1_full(tmp_path: Path) -> None:
    write(tmp_path / "cpuacct", {"cpuacct.usage": "123456\n"})
    write(
        tmp_path / "cpu",
        {"cpu.stat": "nr_periods 5\nnr_throttled 1\nthrottled_time 999\nnr_bursts 0\n"},
    )
    write(
        tmp_path / "memory",
        {
            "memory.usage_in_bytes": "1000\n",
            "memory.max_usage_in_bytes": "2000\n",
            "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        },
    )
    write(
        tmp_path / "blkio",
        {
            "blkio.throttle.io_service_bytes": "254:0 Read 4096\n254:0 Write 512\n"
            "254:0 Sync 0\n254:0 Async 0\n254:0 Total 4608\nTotal 4608\n",
            "blkio.throttle.io_serviced": "254:0 Read 1\n254:0 Write 2\n254:0 Total 3\nTotal 3\n",
        },
    )
    write(tmp_path / "pids", {"pids.current": "4\n"})
    paths = {c: tmp_path / c for c in ("cpu", "cpuacct", "memory", "blkio", "pids")}
    st = read_stats(CgroupFs(), 1, paths)
    assert st == CgroupStats(
        cpu_usage_ns=123456,
        nr_periods=5,
        nr_throttled=1,
        throttled_ns=999,
        memory_current_bytes=1000,
        memory_peak_bytes=2000,
        oom_kills=2,
        io={"254:0": IoStat(4096, 512, 1, 2)},
        pids_current=4,
    )


def test_v1_without_cpuacct_blkio_pids(tmp_path: Path) -> None:
    write(tmp_path / "memory", {"memory.usage_in_bytes": "10\n", "memory.oom_control": "x 0\n"})
    st = read_stats(CgroupFs(), 1, {"memory": tmp_path / "memory"})
    assert st.memory_current_bytes == 10
    assert st.cpu_usage_ns is None
    assert st.io is None
    assert st.pids_current is None
    assert st.oom_kills is None  # old kernel: memory.oom_control without oom_kill


def fake_sysfs(tmp_path: Path) -> Path:
    sysfs = tmp_path / "sys"
    disk = sysfs / "devices" / "pci0" / "block" / "sda"
    part = disk / "sda2"
    part.mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    (part / "dev").write_text("8:2\n")
    (part / "partition").write_text("2\n")
    links = sysfs / "dev" / "block"
    links.mkdir(parents=True)
    os.symlink(os.path.relpath(disk, links), links / "8:0")
    os.symlink(os.path.relpath(part, links), links / "8:2")
    return sysfs


def test_whole_disk_resolves_partition(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path)
    assert whole_disk(8, 2, sysfs) == "8:0"
    assert whole_disk(8, 0, sysfs) == "8:0"


def test_whole_disk_virtual_fs(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path)
    with pytest.raises(CgroupError, match="not a block device") as info:
        whole_disk(0, 45, sysfs)
    assert info.value.value == "0:45"
