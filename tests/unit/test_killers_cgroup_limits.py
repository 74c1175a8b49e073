"""vm/cgroups/limits.py: what the golden lists leave open (records, refusals, edges)."""

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
from ironclaw_orchestrator.vm.cgroups.limits import setting
from ironclaw_orchestrator.vm.config import JailerConfig


def test_setting_round_trips_through_its_record() -> None:
    for s in (
        CgroupSetting("memory", "memory.max", "1048576", True),
        CgroupSetting("io", "io.max", "8:0 rbps=1", False),
    ):
        data = s.to_dict()
        assert data == {
            "controller": s.controller,
            "file": s.file,
            "value": s.value,
            "via_jailer": s.via_jailer,
        }
        assert CgroupSetting.from_dict(data) == s


def test_from_dict_normalises_types() -> None:
    """A record read back from JSON may hold numbers; the setting holds strings and a bool."""
    s = CgroupSetting.from_dict(
        {"controller": "pids", "file": "pids.max", "value": 64, "via_jailer": 1}
    )
    assert s == CgroupSetting("pids", "pids.max", "64", True)
    assert (
        CgroupSetting.from_dict(
            {"controller": "cpu", "file": "cpu.max", "value": "max", "via_jailer": 0}
        ).via_jailer
        is False
    )


def test_setting_decides_via_jailer_from_file_and_value() -> None:
    assert setting("pids", "pids.max", 10) == CgroupSetting("pids", "pids.max", "10", True)
    assert setting("io", "io.max", "8:0 rbps=1") == CgroupSetting(
        "io", "io.max", "8:0 rbps=1", False
    )
    assert setting("x", "a.b", "v").jailer_arg == "a.b=v"


@pytest.mark.parametrize(
    ("file", "value", "ok"),
    [
        ("memory.max", "1", True),
        ("memory.max", "a=b", False),  # the jailer splits FILE=VALUE on every '='
        ("memory", "1", False),  # needs controller.property
        ("a.b.c", "1", False),
        ("cpu.max", "", True),
    ],
)
def test_jailer_parse_rule_edges(file: str, value: str, ok: bool) -> None:
    assert jailer_can_pass(file, value) is ok


def test_cpu_shares_bounds() -> None:
    assert cpu_shares(0) == 2  # the kernel's minimum
    assert cpu_shares(1) == 10
    assert cpu_shares(50) == 512
    assert cpu_shares(99) == 1013  # rounds down


def test_io_refusal_lists_the_limits_set() -> None:
    cfg = JailerConfig(io_write_iops=1, io_read_bps=2)
    with pytest.raises(ConfigError) as info:
        cgroup_settings(cfg, 2, None)
    assert str(info.value) == (
        "io limits rbps, wiops need the block device holding the VM's disks: pass "
        "io_device='MAJ:MIN' (disk_device_for(rootfs_path)) or unset the io_* limits"
    )
    with pytest.raises(ConfigError, match=r"^io limits wbps need"):
        cgroup_settings(JailerConfig(io_write_bps=1), 1, None)


def test_fractional_cpu_limit_sets_the_quota() -> None:
    cfg = JailerConfig(cpu_count=2, cpu_limit=0.5, cpu_period_us=200_000)
    assert cgroup_settings(cfg, 2, None)[0] == setting("cpu", "cpu.max", "100000 200000")
    v1 = cgroup_settings(cfg, 1, None)
    assert v1[:2] == [
        setting("cpu", "cpu.cfs_period_us", 200_000),
        setting("cpu", "cpu.cfs_quota_us", 100_000),
    ]


def test_each_optional_limit_alone() -> None:
    """Each optional setting appears exactly when its key is set (none leaks into another)."""
    base2 = {s.file for s in cgroup_settings(JailerConfig(), 2, None)}
    base1 = {s.file for s in cgroup_settings(JailerConfig(), 1, None)}
    cases = {
        "cpu_weight": (10, {"cpu.weight"}, {"cpu.shares"}),
        "memory_high_mb": (200, {"memory.high"}, {"memory.soft_limit_in_bytes"}),
        "cpuset_cpus": ("0", {"cpuset.cpus"}, {"cpuset.cpus"}),
        "cpuset_mems": ("0", {"cpuset.mems"}, {"cpuset.mems"}),
        "pids_max": (32, {"pids.max"}, {"pids.max"}),
        "io_read_iops": (5, {"io.max"}, {"blkio.throttle.read_iops_device"}),
    }
    for key, (value, v2_files, v1_files) in cases.items():
        cfg = JailerConfig(**{key: value})  # type: ignore[arg-type]
        assert {s.file for s in cgroup_settings(cfg, 2, "8:0")} - base2 == v2_files, key
        assert {s.file for s in cgroup_settings(cfg, 1, "8:0")} - base1 == v1_files, key


def test_values_of_optional_limits() -> None:
    cfg = JailerConfig(cpu_weight=200, memory_high_mb=3, pids_max=7, cpuset_mems="1")
    v2 = {s.file: s.value for s in cgroup_settings(cfg, 2, None)}
    assert (v2["cpu.weight"], v2["memory.high"], v2["pids.max"], v2["cpuset.mems"]) == (
        "200",
        str(3 << 20),
        "7",
        "1",
    )
    v1 = {s.file: s.value for s in cgroup_settings(cfg, 1, None)}
    assert (v1["cpu.shares"], v1["memory.soft_limit_in_bytes"], v1["pids.max"]) == (
        "2048",
        str(3 << 20),
        "7",
    )


def test_jailer_cgroup_args_keep_order_and_skip_the_rest() -> None:
    settings = [
        CgroupSetting("cpu", "cpu.max", "1 2", True),
        CgroupSetting("io", "io.max", "8:0 rbps=1", False),
        CgroupSetting("pids", "pids.max", "3", True),
    ]
    assert jailer_cgroup_args(settings) == ["--cgroup", "cpu.max=1 2", "--cgroup", "pids.max=3"]
    assert jailer_cgroup_args([]) == []
