"""Properties of the cgroup values a VM's limits become (vm/cgroups/limits.py) and of how they
reach the jailer's command line (vm/jailer_args.py).

For every valid ``JailerConfig``, on both cgroup versions: the CPU quota is the asked share of
the period, the memory limit is the configured MiB in bytes, each limit is written exactly
once, in an order the kernel accepts, and every value the jailer can take is on its command
line, unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.binaries import Version
from ironclaw_orchestrator.vm.cgroups.limits import (
    CgroupSetting,
    cgroup_settings,
    cpu_shares,
    jailer_can_pass,
    jailer_cgroup_args,
)
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig
from ironclaw_orchestrator.vm.jailer_args import CgroupArg, build_jailer_argv

MIB = 1 << 20
versions = st.sampled_from([1, 2])


@st.composite
def jailer_configs(draw: st.DrawFn) -> JailerConfig:
    cpu_count = draw(st.integers(1, 32))
    period = draw(st.sampled_from([100_000, 1_000, 1_000_000]) | st.integers(1_000, 1_000_000))
    cpu_limit = draw(
        st.none()
        | st.floats(min_value=max(0.01, 1000 / period), max_value=32, allow_nan=False)
        | st.sampled_from([0.5, 0.25, 1.5, 0.01])
    )
    if cpu_limit is not None:
        assume(round(cpu_limit * period) >= 1000)
    kw: dict[str, object] = {
        "cpu_count": cpu_count,
        "cpu_period_us": period,
        "cpu_limit": cpu_limit,
        "memory_limit_mb": draw(st.integers(128, 2 << 20)),
        "cpu_weight": draw(st.none() | st.integers(1, 10_000)),
        "memory_high_mb": draw(st.none() | st.integers(1, 2 << 20)),
        "pids_max": draw(st.none() | st.integers(1, 1 << 22)),
        "cpuset_cpus": draw(st.none() | st.sampled_from(["0", "0-1", "0,2-3"])),
        "cpuset_mems": draw(st.none() | st.just("0")),
    }
    for key in ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops"):
        kw[key] = draw(st.none() | st.integers(1, 2**63 - 1))
    return JailerConfig(**kw)  # type: ignore[arg-type]


def _io_device(cfg: JailerConfig) -> str | None:
    io = (cfg.io_read_bps, cfg.io_write_bps, cfg.io_read_iops, cfg.io_write_iops)
    return "8:0" if any(v is not None for v in io) else None


def _by_file(settings: list[CgroupSetting]) -> dict[str, str]:
    files = [s.file for s in settings]
    assert len(files) == len(set(files)), f"a file is written twice: {files}"
    return {s.file: s.value for s in settings}


@given(jailer_configs(), versions)
def test_cpu_quota_is_the_asked_share_of_the_period(
    cfg: JailerConfig, version: Literal[1, 2]
) -> None:
    files = _by_file(cgroup_settings(cfg, version, _io_device(cfg)))
    if version == 1:
        quota, period = int(files["cpu.cfs_quota_us"]), int(files["cpu.cfs_period_us"])
    else:
        q, p = files["cpu.max"].split(" ")
        quota, period = int(q), int(p)
    cpus = cfg.cpu_limit if cfg.cpu_limit is not None else cfg.cpu_count
    assert period == cfg.cpu_period_us
    assert quota >= 1000  # the kernel's minimum quota
    assert abs(quota - cpus * period) <= 0.5  # fractional CPUs are kept, to the microsecond


@given(jailer_configs(), versions)
def test_memory_hard_limit_is_the_configured_mib_once(
    cfg: JailerConfig, version: Literal[1, 2]
) -> None:
    settings = cgroup_settings(cfg, version, _io_device(cfg))
    files = _by_file(settings)
    hard = "memory.limit_in_bytes" if version == 1 else "memory.max"
    other = "memory.max" if version == 1 else "memory.limit_in_bytes"
    assert int(files[hard]) == cfg.memory_limit_mb * MIB
    assert other not in files
    (mem,) = [s for s in settings if s.file == hard]
    assert mem.controller == "memory" and mem.via_jailer  # set before the VMM runs
    if cfg.memory_high_mb is not None:
        soft = "memory.soft_limit_in_bytes" if version == 1 else "memory.high"
        assert int(files[soft]) == cfg.memory_high_mb * MIB


@given(jailer_configs(), versions)
def test_optional_limits_appear_exactly_when_set(cfg: JailerConfig, version: Literal[1, 2]) -> None:
    files = _by_file(cgroup_settings(cfg, version, _io_device(cfg)))
    assert ("pids.max" in files) is (cfg.pids_max is not None)
    if cfg.pids_max is not None:
        assert int(files["pids.max"]) == cfg.pids_max
    assert ("cpuset.cpus" in files) is (cfg.cpuset_cpus is not None)
    assert ("cpuset.mems" in files) is (cfg.cpuset_mems is not None)
    weight_file = "cpu.shares" if version == 1 else "cpu.weight"
    assert (weight_file in files) is (cfg.cpu_weight is not None)
    if cfg.cpu_weight is not None and version == 2:
        assert int(files["cpu.weight"]) == cfg.cpu_weight
    io = _io_device(cfg) is not None
    assert ("io.max" in files or any(f.startswith("blkio.") for f in files)) is io


@given(jailer_configs(), versions)
def test_write_order_is_one_the_kernel_accepts(cfg: JailerConfig, version: Literal[1, 2]) -> None:
    """v1: the period before the quota (a quota above the old period is refused);
    cpuset.cpus before cpuset.mems."""
    order = [s.file for s in cgroup_settings(cfg, version, _io_device(cfg))]
    if version == 1:
        assert order.index("cpu.cfs_period_us") < order.index("cpu.cfs_quota_us")
    if "cpuset.cpus" in order and "cpuset.mems" in order:
        assert order.index("cpuset.cpus") < order.index("cpuset.mems")


@given(jailer_configs(), versions)
def test_each_setting_goes_to_the_jailer_iff_its_parser_takes_it(
    cfg: JailerConfig, version: Literal[1, 2]
) -> None:
    """The v1.0 jailer splits ``--cgroup`` on '=' (two parts) and the file on '.' (two parts)."""
    for s in cgroup_settings(cfg, version, _io_device(cfg)):
        parsable = s.file.count(".") == 1 and "=" not in s.file and "=" not in s.value
        assert s.via_jailer is parsable, s
        assert s.via_jailer is jailer_can_pass(s.file, s.value)
        assert s.file.split(".")[0] == s.controller
        assert CgroupSetting.from_dict(s.to_dict()) == s


def _jailer_argv(cfg: JailerConfig, args: list[CgroupArg], version: int = 2) -> list[str]:
    return build_jailer_argv(
        cfg,
        jailer=Path("/usr/local/bin/jailer"),
        exec_file=Path("/usr/local/bin/firecracker-v1.0.0"),
        version=Version(1, 0, 0),
        cgroup_version=version,
        cgroups=args,
        parent_cgroup="ironclaw",
        netns=None,
    )


def _cgroup_flags(argv: list[str]) -> list[str]:
    sep = argv.index("--")
    return [argv[i + 1] for i, a in enumerate(argv[:sep]) if a == "--cgroup"]


@given(jailer_configs(), versions)
def test_every_jailer_setting_is_on_the_jailer_command_line(
    cfg: JailerConfig, version: Literal[1, 2]
) -> None:
    """What start-up passes (the settings the jailer can take) all reach ``--cgroup``, in
    order, unchanged: the memory limit above all (without it the guest is unbounded)."""
    settings = cgroup_settings(cfg, version, _io_device(cfg))
    args = [CgroupArg(s.file, s.value) for s in settings if s.via_jailer]
    argv = _jailer_argv(cfg, args, version)
    flags = _cgroup_flags(argv)
    assert flags == [f"{s.file}={s.value}" for s in settings if s.via_jailer]
    assert flags == jailer_cgroup_args(settings)[1::2]
    hard = "memory.limit_in_bytes" if version == 1 else "memory.max"
    assert f"{hard}={cfg.memory_limit_mb * MIB}" in flags
    assert argv[argv.index("--cgroup-version") + 1] == str(version)


cgroup_args = st.lists(
    st.builds(
        CgroupArg,
        st.sampled_from(["memory.max", "memory.limit_in_bytes", "cpu.max", "pids.max", "x.y"]),
        st.text("0123456789 -max", min_size=1, max_size=12),
    ),
    max_size=8,
)


@given(cgroup_args)
def test_build_jailer_argv_passes_every_cgroup_arg_once_in_order(args: list[CgroupArg]) -> None:
    argv = _jailer_argv(JailerConfig(jailer_id="vm1"), args)
    assert _cgroup_flags(argv) == [a.render() for a in args]
    assert ("--cgroup-version" in argv) is bool(args)
    assert "--id" not in argv[argv.index("--") :]


@given(st.integers(1, 10_000), st.integers(1, 10_000))
def test_cpu_shares_preserve_the_weights_order(a: int, b: int) -> None:
    """v1 ``cpu.shares`` from v2 ``cpu.weight``: the kernel's range (2..262144), the default
    (100 -> 1024), and a heavier weight never gets fewer shares."""
    assert 2 <= cpu_shares(a) <= 262_144
    assert cpu_shares(100) == 1024
    if a <= b:
        assert cpu_shares(a) <= cpu_shares(b)


@given(st.integers(128, 1 << 20), st.integers(16, 65536), versions)
def test_vm_config_memory_reaches_the_cgroup(
    memory_mb: int, headroom: int, version: Literal[1, 2]
) -> None:
    """From ``VmConfig`` to the cgroup file: guest memory + head-room, never less than the
    guest plus the VMM's overhead."""
    cfg = VmConfig(memory_mb=memory_mb, memory_headroom_mb=headroom).jailer_config()
    files = _by_file(cgroup_settings(cfg, version, None))
    limit = int(files["memory.limit_in_bytes" if version == 1 else "memory.max"])
    assert limit == (memory_mb + headroom) * MIB
    assert limit >= (memory_mb + 16) * MIB


@pytest.mark.parametrize("version", [1, 2])
def test_fractional_cpu_limit_reaches_the_cgroup(version: Literal[1, 2]) -> None:
    files = _by_file(cgroup_settings(JailerConfig(cpu_limit=0.5, cpu_count=2), version, None))
    if version == 1:
        assert (files["cpu.cfs_quota_us"], files["cpu.cfs_period_us"]) == ("50000", "100000")
    else:
        assert files["cpu.max"] == "50000 100000"


@pytest.mark.parametrize("version", [1, 2])
def test_memory_limit_values(version: Literal[1, 2]) -> None:
    files = _by_file(cgroup_settings(JailerConfig(memory_limit_mb=128), version, None))
    key = "memory.limit_in_bytes" if version == 1 else "memory.max"
    assert files[key] == str(128 * MIB)


def test_io_limits_need_the_device() -> None:
    with pytest.raises(ConfigError, match="io_device"):
        cgroup_settings(JailerConfig(io_read_bps=1), 2, None)
