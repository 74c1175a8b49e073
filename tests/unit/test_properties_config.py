"""Properties and boundaries of ``VmConfig`` / ``JailerConfig`` validation (vm/config.py).

The numeric domains below are the documented ones (README's configuration reference, the
facts note), written out as numbers rather than imported, so a changed bound in the code is
a failing test, not a silently changed expectation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig

MIB = 1 << 20

#: (model, field, smallest accepted, largest accepted), as documented.
INT_DOMAINS: list[tuple[type[Any], str, int, int]] = [
    (VmConfig, "vcpu_count", 1, 32),
    (VmConfig, "memory_mb", 128, 1 << 20),  # 1 TiB
    (VmConfig, "memory_headroom_mb", 16, 65536),
    (VmConfig, "vsock_guest_cid", 3, 2**32 - 2),  # 0-2 are reserved CIDs; -1 is "any"
    (JailerConfig, "cpu_count", 1, 32),
    (JailerConfig, "memory_limit_mb", 128, 2 << 20),  # 2 TiB
    (JailerConfig, "uid", 1, 2**32 - 2),  # never root; (uid_t)-1 means "unchanged"
    (JailerConfig, "gid", 1, 2**32 - 2),
    (JailerConfig, "no_file", 16, 1 << 20),  # nr_open
    (JailerConfig, "fsize", 1, 2**63 - 1),
    (JailerConfig, "pids_max", 1, 1 << 22),  # PID_MAX_LIMIT
    (JailerConfig, "cpu_weight", 1, 10_000),  # cgroup v2 cpu.weight
    (JailerConfig, "cpu_period_us", 1_000, 1_000_000),  # the kernel's CFS period bounds
    (JailerConfig, "io_read_bps", 1, 2**63 - 1),
    (JailerConfig, "io_write_iops", 1, 2**63 - 1),
]


#: The integer fields that may be left unset (``None``).
OPTIONAL = frozenset(
    {
        "vsock_guest_cid",
        "fsize",
        "pids_max",
        "cpu_weight",
        "io_read_bps",
        "io_write_iops",
        "no_file",
    }
)


@st.composite
def int_field_values(draw: st.DrawFn) -> tuple[type[Any], str, int, int, object]:
    model, field, lo, hi = draw(st.sampled_from(INT_DOMAINS))
    value = draw(
        st.one_of(
            st.sampled_from([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1, 0, -1]),
            st.integers(lo - 1000, hi + 1000),
            st.integers(),
        )
    )
    return model, field, lo, hi, value


def _build(model: type[Any], field: str, value: object) -> Any:
    if model is VmConfig and field == "memory_mb":
        return VmConfig(memory_mb=value)  # the derived memory limit follows it
    return model(**{field: value})


@given(int_field_values())
def test_integer_fields_accept_exactly_their_documented_range(
    case: tuple[type[Any], str, int, int, int],
) -> None:
    model, field, lo, hi, value = case
    if lo <= value <= hi:
        assert getattr(_build(model, field, value), field) == value
    else:
        with pytest.raises(ConfigError, match=field):
            _build(model, field, value)


@given(
    st.sampled_from(INT_DOMAINS),
    st.sampled_from([True, False, "2", 2.0, 1.5, None, b"2"]),
)
def test_integer_fields_refuse_other_types(
    domain: tuple[type[Any], str, int, int], bad: object
) -> None:
    """``true`` is not 1, ``"2"`` is not 2, ``2.0`` is not 2 (README: validation is strict)."""
    model, field, _, _ = domain
    if bad is None and field in OPTIONAL:
        return  # None means unset
    with pytest.raises(ConfigError, match=field):
        model(**{field: bad})


# --------------------------------------------------------------------------- memory


@given(st.integers(128, 1 << 20), st.integers(16, 65536))
def test_derived_memory_limit_always_holds_guest_plus_vmm(memory_mb: int, headroom: int) -> None:
    """Guest RAM is charged to the VMM's cgroup: the derived limit never OOM-kills a guest."""
    cfg = VmConfig(memory_mb=memory_mb, memory_headroom_mb=headroom)
    limit = cfg.jailer_config().memory_limit_mb
    assert limit == memory_mb + headroom
    assert limit >= memory_mb + 16  # + the VMM's own overhead
    # The derived config is itself valid when given explicitly.
    VmConfig(memory_mb=memory_mb, jailer=JailerConfig(memory_limit_mb=limit))


@given(st.integers(128, 1 << 20), st.integers(-64, 64))
def test_explicit_memory_limit_must_cover_guest_and_overhead(memory_mb: int, delta: int) -> None:
    limit = memory_mb + 16 + delta
    if delta >= 0:
        cfg = VmConfig(memory_mb=memory_mb, jailer=JailerConfig(memory_limit_mb=limit))
        assert cfg.jailer_config().memory_limit_mb == limit
    else:
        with pytest.raises(ConfigError, match="memory_limit_mb"):
            VmConfig(memory_mb=memory_mb, jailer=JailerConfig(memory_limit_mb=limit))


def test_memory_boundaries() -> None:
    VmConfig(memory_mb=128)  # exactly the minimum
    with pytest.raises(ConfigError, match="memory_mb"):
        VmConfig(memory_mb=127)
    VmConfig(memory_mb=1 << 20)
    with pytest.raises(ConfigError, match="memory_mb"):
        VmConfig(memory_mb=(1 << 20) + 1)
    # jailer.memory_limit_mb exactly guest + overhead, and one below.
    VmConfig(memory_mb=256, jailer=JailerConfig(memory_limit_mb=272))
    with pytest.raises(ConfigError, match="memory_limit_mb=271"):
        VmConfig(memory_mb=256, jailer=JailerConfig(memory_limit_mb=271))
    JailerConfig(memory_limit_mb=128)
    with pytest.raises(ConfigError, match="memory_limit_mb"):
        JailerConfig(memory_limit_mb=127)


# --------------------------------------------------------------------------- cpu


@given(
    st.floats(min_value=0.0, max_value=40.0, allow_nan=False),
    st.integers(1_000, 1_000_000),
)
def test_cpu_limit_domain_and_quota(cpu_limit: float, period: int) -> None:
    """Accepted: 0.01..32 CPUs whose quota the kernel can express (>= 1 ms per period); the
    quota is then the asked fraction of the period, to the microsecond."""
    expressible = round(cpu_limit * period) >= 1000
    if not 0.01 <= cpu_limit <= 32:
        with pytest.raises(ConfigError, match="cpu_limit"):
            JailerConfig(cpu_limit=cpu_limit, cpu_period_us=period)
        return
    if not expressible:
        with pytest.raises(ConfigError, match="cpu_period_us to at least"):
            JailerConfig(cpu_limit=cpu_limit, cpu_period_us=period)
        return
    cfg = JailerConfig(cpu_limit=cpu_limit, cpu_period_us=period)
    assert abs(cfg.cpu_quota_us - cpu_limit * period) <= 0.5
    # The suggested period really works.
    assert JailerConfig(cpu_limit=cpu_limit, cpu_period_us=max(period, 100_000)).cpu_quota_us


@given(st.integers(1, 32), st.integers(1_000, 1_000_000))
def test_cpu_count_is_the_quota_without_cpu_limit(cpus: int, period: int) -> None:
    cfg = JailerConfig(cpu_count=cpus, cpu_period_us=period)
    assert cfg.cpu_quota_us == cpus * period


def test_fractional_cpu_limit_boundaries() -> None:
    assert JailerConfig(cpu_limit=0.5).cpu_quota_us == 50_000
    assert JailerConfig(cpu_limit=0.01).cpu_quota_us == 1_000  # the smallest quota there is
    assert JailerConfig(cpu_limit=2.25, cpu_count=4).cpu_quota_us == 225_000
    with pytest.raises(ConfigError, match="cpu_limit"):
        JailerConfig(cpu_limit=0.0099)
    with pytest.raises(ConfigError, match="quota of 500 us"):
        JailerConfig(cpu_limit=0.5, cpu_period_us=1_000)


# --------------------------------------------------------------------------- boot args


@given(st.text(max_size=2100))
def test_boot_args_accept_exactly_printable_ascii_up_to_2047(value: str) -> None:
    """What a Linux guest reads: printable ASCII (Firecracker refuses the rest), quotes
    closed, at most 2047 bytes (x86 COMMAND_LINE_SIZE with its NUL)."""
    ok = len(value) <= 2047 and all(" " <= c <= "~" for c in value) and value.count('"') % 2 == 0
    if ok:
        assert VmConfig(boot_args=value, rootfs_path=None).boot_args == value
    else:
        with pytest.raises(ConfigError, match="boot_args"):
            VmConfig(boot_args=value, rootfs_path=None)


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=2040, max_size=2060))
def test_boot_args_length_boundary(value: str) -> None:
    value = value.replace('"', "q")
    if len(value) <= 2047:
        VmConfig(boot_args=value, rootfs_path=None)
    else:
        with pytest.raises(ConfigError, match="2047"):
            VmConfig(boot_args=value, rootfs_path=None)


#: What Firecracker v1.0 appends, as the CMDLINE probe sees it for real
#: (tests/integration/test_cmdline_real.py): `` virtio_mmio.device=4K@0xd0000000:15`` per
#: device, and `` root=/dev/vda rw`` for a root drive.
DEVICE_ARG = 36
ROOT_ARG = 17


@pytest.mark.parametrize(
    ("reserved", "kw"),
    [
        (0, {"rootfs_path": None}),
        (ROOT_ARG + DEVICE_ARG, {}),  # the root drive
        (ROOT_ARG + 2 * DEVICE_ARG, {"vsock_guest_cid": 3}),
        (DEVICE_ARG, {"rootfs_path": None, "vsock_guest_cid": 3}),
    ],
)
def test_boot_args_exact_boundary(reserved: int, kw: dict[str, object]) -> None:
    """Room is left for what Firecracker appends: a Linux guest whose line runs past 2047
    bytes loses the end of it, and with it its devices."""
    longest = 2047 - reserved
    VmConfig(boot_args="x" * longest, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="2047"):
        VmConfig(boot_args="x" * (longest + 1), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- paths


@given(st.text(min_size=1, max_size=60))
def test_host_paths_are_absolute_and_control_free(value: str) -> None:
    """An accepted host path is absolute (recorded, then cleaned up from any directory)."""
    try:
        cfg = JailerConfig(chroot_base_dir=value)
    except ConfigError as exc:
        assert "chroot_base_dir" in str(exc)
        assert (
            "\x00" in value
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)
            or (any(len(part.encode()) > 255 for part in value.split("/")))
        )
        return
    assert cfg.chroot_base_dir.is_absolute()
    assert not any(ord(c) < 0x20 for c in str(cfg.chroot_base_dir))


@given(st.text(max_size=40))
def test_jail_relative_paths(value: str) -> None:
    """``api_sock``: absolute inside the jail, no '..' (it must not point out of the chroot)."""
    try:
        cfg = JailerConfig(api_sock=value)
    except ConfigError as exc:
        assert "api_sock" in str(exc)
        return
    assert cfg.api_sock.is_absolute()
    assert ".." not in cfg.api_sock.parts
    assert cfg.api_socket_path.is_relative_to(cfg.chroot_dir)


@given(st.from_regex(r"[0-9]{1,2}(-[0-9]{1,2})?(,[0-9]{1,2}(-[0-9]{1,2})?){0,3}", fullmatch=True))
def test_cpu_lists(value: str) -> None:
    """A cpuset list is accepted iff no range runs backwards (what the kernel refuses)."""
    backwards = any(
        int(hi) < int(lo) for lo, _, hi in (part.partition("-") for part in value.split(",")) if hi
    )
    if backwards:
        with pytest.raises(ConfigError, match="backwards"):
            JailerConfig(cpuset_cpus=value)
    else:
        assert JailerConfig(cpuset_cpus=value).cpuset_cpus == value


@given(st.text(max_size=12))
@example("\u1040")  # a Myanmar zero: a digit to a regex, not to the kernel
def test_cpu_list_garbage_is_refused(value: str) -> None:
    try:
        JailerConfig(cpuset_mems=value)
    except ConfigError as exc:
        assert "cpuset_mems" in str(exc)
        return
    assert value and set(value) <= set("0123456789-,")


@given(st.sampled_from(["netns", "api_sock"]), st.text(max_size=20))
def test_paths_from_the_config_never_hold_control_characters(field: str, text: str) -> None:
    value = "/run/" + text
    try:
        cfg = JailerConfig(**{field: value})
    except ConfigError:
        return
    assert all(ord(c) >= 0x20 and ord(c) != 0x7F for c in str(getattr(cfg, field)))


def test_relative_host_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert JailerConfig(chroot_base_dir="jail").chroot_base_dir == tmp_path / "jail"
