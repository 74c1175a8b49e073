"""Properties of the remaining validators: rate limits (vm/ratelimit.py), ``cgroup_version``,
``image_dirs``, ``vsock_uds_path``, the probe's arguments, guest memory against the host's RAM
(vm/hostcheck.py, used by vm/inputs.py)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig
from ironclaw_orchestrator.vm.hostcheck import check_guest_memory, host_memory_mib
from ironclaw_orchestrator.vm.probe import ProbeBehaviour, build_probe_kernel
from ironclaw_orchestrator.vm.ratelimit import TokenBucket, VsockRateLimit

U64 = 2**64 - 1
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@given(
    st.integers(0, 2**45),
    st.sampled_from(sorted(UNITS)),
    st.sampled_from(["", "iB", "B", "ib"]),
    st.integers(0, 10**6),
    st.sampled_from(["", "ms", "s", "MS"]),
    st.none() | st.integers(0, 2**30),
)
def test_token_bucket_spec_means_what_it_says(
    n: int, unit: str, suffix: str, t: int, tunit: str, burst: int | None
) -> None:
    """``SIZE/TIME[,burst=N]``: binary units, ms by default; Firecracker's u64 bounds, and a
    bucket that refills (size and time >= 1)."""
    spec = f"{n}{unit}{suffix if unit else ''}/{t}{tunit}"
    if burst is not None:
        spec += f",burst={burst}"
    size = n * UNITS[unit]
    refill = t * (1000 if tunit == "s" else 1)
    if not (1 <= size <= U64 and 1 <= refill <= U64):
        with pytest.raises(ConfigError, match=r"size|refill_time_ms"):
            TokenBucket.parse(spec)
        return
    bucket = TokenBucket.parse(spec)
    assert (bucket.size, bucket.refill_time_ms, bucket.one_time_burst) == (size, refill, burst)
    assert bucket.to_api()["refill_time"] == refill
    assert math.isclose(bucket.rate_per_s, size * 1000 / refill)


@given(
    st.sampled_from(["size", "refill_time_ms", "one_time_burst"]),
    st.sampled_from([True, "10", 10.0, 1.5]),
)
def test_token_bucket_fields_are_strict(field: str, bad: object) -> None:
    kw: dict[str, object] = {"size": 10, "refill_time_ms": 10, field: bad}
    with pytest.raises(ConfigError, match=field):
        TokenBucket(**kw)  # type: ignore[arg-type]


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 5) | st.booleans())
def test_vsock_connection_rate_is_finite_and_positive(value: float) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )
    if ok:
        assert VsockRateLimit(connections_per_s=value).connections_per_s == value
    else:
        with pytest.raises(ConfigError, match="connections_per_s"):
            VsockRateLimit(connections_per_s=value)


@given(
    st.one_of(st.none(), st.integers(-3, 4), st.booleans(), st.floats(0, 3), st.text(max_size=2))
)
def test_cgroup_version_is_the_integer_1_or_2(value: object) -> None:
    ok = value is None or (type(value) is int and value in (1, 2))
    if ok:
        assert JailerConfig(cgroup_version=value).cgroup_version == value  # type: ignore[arg-type]
    else:
        with pytest.raises(ConfigError, match="cgroup_version"):
            JailerConfig(cgroup_version=value)  # type: ignore[arg-type]


@given(st.lists(st.sampled_from(["/srv/images", "images", "/a\nb", "", "/var/lib/x"]), max_size=3))
def test_image_dirs_are_absolute_directories(dirs: list[str]) -> None:
    ok = bool(dirs) and all(d.startswith("/") and "\n" not in d for d in dirs)
    if ok:
        assert VmConfig(image_dirs=dirs).jailer_config().image_dirs == tuple(Path(d) for d in dirs)
    else:
        with pytest.raises(ConfigError, match="image_dirs"):
            VmConfig(image_dirs=dirs)


@given(st.text(max_size=30))
def test_vsock_path_stays_inside_the_jail(value: str) -> None:
    try:
        cfg = VmConfig(vsock_uds_path=value)
    except ConfigError as exc:
        assert "vsock_uds_path" in str(exc)
        return
    assert cfg.vsock_uds_path.is_absolute() and ".." not in cfg.vsock_uds_path.parts
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in str(cfg.vsock_uds_path))


@given(
    st.sampled_from(list(ProbeBehaviour)),
    st.one_of(st.integers(-2, 1100), st.booleans(), st.floats(0, 10)),
    st.one_of(st.integers(-2, 2**31 + 2), st.sampled_from([2**31 - 1, 2**31, 1, 0])),
)
def test_probe_arguments(behaviour: ProbeBehaviour, touch: object, ticks: int) -> None:
    """touch_mib: 0..1008 (the touched range, from 16 MiB, stays in the first GiB that
    Firecracker identity-maps); count_ticks: 1..2**31-1 (a sign-extended imm32)."""
    touch_ok = type(touch) is int and 0 <= touch <= 1024 - 16
    ticks_ok = 1 <= ticks < 2**31
    if touch_ok and ticks_ok:
        assert build_probe_kernel(behaviour, touch, count_ticks=ticks)[:4] == b"\x7fELF"  # type: ignore[arg-type]
    else:
        with pytest.raises(ConfigError, match="touch_mib" if not touch_ok else "count_ticks"):
            build_probe_kernel(behaviour, touch, count_ticks=ticks)  # type: ignore[arg-type]


@given(st.integers(1, 1 << 24), st.integers(128, 1 << 20))
def test_guest_memory_must_fit_the_hosts_ram(total_kib: int, memory_mb: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        meminfo = Path(tmp) / "meminfo"
        meminfo.write_text(f"MemTotal:       {total_kib} kB\nMemFree:        1 kB\n")
        total_mib = total_kib // 1024
        assert host_memory_mib(meminfo) == total_mib
        if memory_mb <= total_mib:
            check_guest_memory(memory_mb, meminfo)
        else:
            with pytest.raises(ConfigError, match=f"memory_mb={memory_mb} is more than"):
                check_guest_memory(memory_mb, meminfo)


def test_guest_memory_boundary(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        2097152 kB\n")  # 2048 MiB
    check_guest_memory(2048, meminfo)
    with pytest.raises(ConfigError, match="2048 MiB"):
        check_guest_memory(2049, meminfo)
    check_guest_memory(1 << 20, tmp_path / "missing")  # unknown RAM: start-up decides
