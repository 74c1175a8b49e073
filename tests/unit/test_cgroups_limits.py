"""JailerConfig -> cgroup settings, golden lists per version."""

from __future__ import annotations

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.cgroups import (
    CgroupSetting,
    cgroup_settings,
    cpu_shares,
    jailer_can_pass,
    jailer_cgroup_args,
)
from ironclaw_orchestrator.vm.config import JailerConfig

FULL = JailerConfig(
    cpu_count=2,
    cpu_period_us=50_000,
    cpu_weight=50,
    memory_limit_mb=300,
    memory_high_mb=256,
    cpuset_cpus="0-1",
    cpuset_mems="0",
    pids_max=100,
    io_read_bps=1000,
    io_write_bps=2000,
    io_read_iops=30,
    io_write_iops=40,
)


def S(controller: str, file: str, value: str, via: bool = True) -> CgroupSetting:
    return CgroupSetting(controller, file, value, via)


def test_v1_full() -> None:
    assert cgroup_settings(FULL, 1, "8:0") == [
        S("cpu", "cpu.cfs_period_us", "50000"),
        S("cpu", "cpu.cfs_quota_us", "100000"),
        S("cpu", "cpu.shares", "512"),
        S("memory", "memory.limit_in_bytes", str(300 * 2**20)),
        S("memory", "memory.soft_limit_in_bytes", str(256 * 2**20)),
        S("cpuset", "cpuset.cpus", "0-1"),
        S("cpuset", "cpuset.mems", "0"),
        S("pids", "pids.max", "100"),
        S("blkio", "blkio.throttle.read_bps_device", "8:0 1000", False),
        S("blkio", "blkio.throttle.write_bps_device", "8:0 2000", False),
        S("blkio", "blkio.throttle.read_iops_device", "8:0 30", False),
        S("blkio", "blkio.throttle.write_iops_device", "8:0 40", False),
    ]


def test_v2_full() -> None:
    assert cgroup_settings(FULL, 2, "8:0") == [
        S("cpu", "cpu.max", "100000 50000"),
        S("cpu", "cpu.weight", "50"),
        S("memory", "memory.max", str(300 * 2**20)),
        S("memory", "memory.high", str(256 * 2**20)),
        S("cpuset", "cpuset.cpus", "0-1"),
        S("cpuset", "cpuset.mems", "0"),
        S("pids", "pids.max", "100"),
        S("io", "io.max", "8:0 rbps=1000 wbps=2000 riops=30 wiops=40", False),
    ]


def test_defaults_minimal() -> None:
    cfg = JailerConfig()
    assert cgroup_settings(cfg, 1, None) == [
        S("cpu", "cpu.cfs_period_us", "100000"),
        S("cpu", "cpu.cfs_quota_us", "100000"),
        S("memory", "memory.limit_in_bytes", str(256 * 2**20)),
    ]
    assert cgroup_settings(cfg, 2, None) == [
        S("cpu", "cpu.max", "100000 100000"),
        S("memory", "memory.max", str(256 * 2**20)),
    ]


def test_partial_io_and_cpuset_without_mems() -> None:
    cfg = JailerConfig(io_write_iops=5, cpuset_cpus="1")
    v2 = cgroup_settings(cfg, 2, "254:0")
    assert v2[-1] == S("io", "io.max", "254:0 wiops=5", False)
    assert not any(s.file == "cpuset.mems" for s in v2)  # resolved by prepare()
    v1 = cgroup_settings(cfg, 1, "254:0")
    assert v1[-1] == S("blkio", "blkio.throttle.write_iops_device", "254:0 5", False)


def test_io_needs_device() -> None:
    with pytest.raises(ConfigError, match="io_device"):
        cgroup_settings(JailerConfig(io_read_bps=1), 2, None)


def test_cpu_shares_scaling() -> None:
    assert cpu_shares(100) == 1024
    assert cpu_shares(1) == 10
    assert cpu_shares(10_000) == 102_400
    assert min(cpu_shares(w) for w in range(1, 10)) >= 2


def test_jailer_parse_rule() -> None:
    assert jailer_can_pass("memory.max", "1")
    assert jailer_can_pass("cpu.max", "100000 100000")
    assert not jailer_can_pass("io.max", "8:0 rbps=1")
    assert not jailer_can_pass("blkio.throttle.read_bps_device", "8:0 1")
    assert not jailer_can_pass("memory", "1")


def test_jailer_args_skip_non_jailer() -> None:
    args = jailer_cgroup_args(cgroup_settings(FULL, 2, "8:0"))
    assert args[:2] == ["--cgroup", "cpu.max=100000 50000"]
    assert not any("io.max" in a for a in args)
    assert len(args) == 14
