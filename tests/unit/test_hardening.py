"""Rate-limit and seccomp plumbing without a VM: flags, preflight refusals, live updates.

The refusals run on the stand-in host (``standin_host.py``): should one break, the start goes
ahead on the stand-in jailer and firecracker, and the test fails naming what was made.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from standin_host import StandinHost, make_refusal_host

from ironclaw_orchestrator import doctor
from ironclaw_orchestrator.cli.common import hardening_overrides, merge_overrides
from ironclaw_orchestrator.cli.vm import build_config
from ironclaw_orchestrator.doctor import HostPaths, Status
from ironclaw_orchestrator.errors import ConfigError, UsageError
from ironclaw_orchestrator.lsm import LsmPaths
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import FirecrackerProcess, start_firecracker
from ironclaw_orchestrator.vm.config import VmConfig
from ironclaw_orchestrator.vm.ratelimit import RateLimit, TokenBucket, VsockRateLimit


def flags(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "rate_limit": None,
        "seccomp_filter": None,
        "no_seccomp": False,
        "apparmor_profile": None,
        "selinux_label": None,
    }
    return hardening_overrides(**{**base, **kw})


def test_rate_limit_flags_become_config() -> None:
    over = flags(
        rate_limit=[
            "drive.bandwidth=10MiB/1s,burst=1G",
            "drive.ops=500/100ms",
            "net-tx.ops=1000/1s",
            "vsock.bytes=1MiB",
            "vsock.connections=2.5",
        ]
    )
    cfg = VmConfig(**merge_overrides({}, over))
    assert cfg.drive_rate_limit == RateLimit(
        bandwidth=TokenBucket(size=10 << 20, refill_time_ms=1000, one_time_burst=1 << 30),
        ops=TokenBucket(size=500, refill_time_ms=100),
    )
    assert cfg.net_tx_rate_limit == RateLimit(ops=TokenBucket(size=1000, refill_time_ms=1000))
    assert cfg.net_rx_rate_limit is None
    assert cfg.vsock_rate_limit == VsockRateLimit(bytes_per_s=1 << 20, connections_per_s=2.5)


def test_flags_merge_into_the_toml_table(tmp_path: Path) -> None:
    toml = tmp_path / "vm.toml"
    toml.write_text(
        'vm_id = "a"\nkernel_path = "/k"\n'
        "[drive_rate_limit.bandwidth]\nsize = 1048576\nrefill_time_ms = 1000\n"
        '[jailer]\nchroot_base_dir = "/var/jail"\n'
    )
    cfg, _ = build_config(
        config_file=toml,
        overrides=flags(
            rate_limit=["drive.ops=10/1s"], no_seccomp=True, apparmor_profile="ironclaw-a"
        ),
        probe=None,
    )
    assert cfg.drive_rate_limit is not None
    assert cfg.drive_rate_limit.bandwidth == TokenBucket(size=1 << 20, refill_time_ms=1000)
    assert cfg.drive_rate_limit.ops == TokenBucket(size=10, refill_time_ms=1000)
    jc = cfg.jailer_config()
    assert jc.no_seccomp and jc.apparmor_profile == "ironclaw-a"
    assert jc.chroot_base_dir == Path("/var/jail")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("drive.speed=1/1s", "unknown key"),
        ("drive.bandwidth", "KEY=VALUE"),
        ("net-rx.ops=fast", "SIZE/TIME"),
        ("vsock.bytes=lots", "size"),
    ],
)
def test_bad_rate_limit_flag_names_itself(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        flags(rate_limit=[spec])
    assert spec in str(info.value)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    """The stand-in host: should a refusal below break, the start runs on stand-ins."""
    monkeypatch.delenv("IRONCLAW_REQUIRE_SANDBOX", raising=False)
    yield from make_refusal_host(monkeypatch)


async def refused(host: StandinHost, cfg: VmConfig, match: str, **kw: Any) -> None:
    """``start_firecracker(cfg)`` raises ``ConfigError`` (``match``); nothing was made."""
    with pytest.raises(ConfigError, match=match):
        vm = await start_firecracker(cfg, registry=Registry(host.state), **kw)
        made = host.made()
        await vm.stop()  # accepted after all: never leave it running
        pytest.fail(f"accepted: started on the stand-in host, making {made}")
    assert host.made() == []


async def test_refusals_before_anything_is_made(host: StandinHost, tmp_path: Path) -> None:
    bare = {"rootfs_path": None}
    await refused(
        host,
        host.vm_config("h13-unit", drive_rate_limit=RateLimit(), **bare),
        "drive_rate_limit needs a root drive",
    )
    await refused(
        host,
        host.vm_config("h13-unit", net_rx_rate_limit=RateLimit(), **bare),
        "need enable_networking",
    )
    await refused(
        host,
        host.vm_config("h13-unit", require_sandbox=True, **bare),  # the stand-in: no_seccomp
        "production mode",
    )
    await refused(
        host,
        host.vm_config(
            "h13-unit",
            jailer={"seccomp_filter": tmp_path / "none.bpf", "no_seccomp": False},
            **bare,
        ),
        r"jailer\.seccomp_filter .* does not exist",
    )


class _Api:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def patch_drive_rate_limit(self, drive_id: str, limit: RateLimit) -> None:
        self.calls.append(("drive", (drive_id, limit)))

    async def patch_network_rate_limits(self, iface: str, **kw: Any) -> None:
        self.calls.append(("net", (iface, kw)))


class _Vmm:
    def __init__(self, booted: bool) -> None:
        self.booted = booted
        self.api = _Api()


async def test_update_rate_limits() -> None:
    limit = RateLimit(ops=TokenBucket(size=1, refill_time_ms=1))
    cfg = VmConfig(rootfs_path="/r", enable_networking=True)
    vmm = _Vmm(booted=False)
    vm = FirecrackerProcess(cfg, vmm)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="only after start_instance"):
        await vm.update_rate_limits(drive=limit)
    vmm.booted = True
    await vm.update_rate_limits(drive=limit, net_tx=limit)
    assert vmm.api.calls == [
        ("drive", ("rootfs", limit)),
        ("net", ("eth0", {"rx": None, "tx": limit})),
    ]
    bare = FirecrackerProcess(VmConfig(rootfs_path=None), _Vmm(booted=True))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no root drive"):
        await bare.update_rate_limits(drive=limit)
    with pytest.raises(UsageError, match="no network interface"):
        await bare.update_rate_limits(net_rx=limit)


def test_doctor_reports_seccomp_and_lsms(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    actions = proc / "sys/kernel/seccomp/actions_avail"
    lsm = LsmPaths(
        lsm_list=tmp_path / "lsm",
        apparmor_enabled=tmp_path / "aa",
        selinux_enforce=tmp_path / "enforce",
    )
    named = {c.name: c for c in doctor.check_confinement(HostPaths(proc=proc, lsm=lsm))}
    assert (
        named["seccomp"].status is Status.FAIL and "CONFIG_SECCOMP_FILTER" in named["seccomp"].fix
    )
    assert named["LSM"].status is Status.WARN and "refused here" in named["LSM"].value
    actions.parent.mkdir(parents=True)
    actions.write_text("kill_process kill_thread trap errno log allow\n")
    (tmp_path / "lsm").write_text("capability,apparmor")
    (tmp_path / "aa").write_text("Y")
    named = {c.name: c for c in doctor.check_confinement(HostPaths(proc=proc, lsm=lsm))}
    assert named["seccomp"].status is Status.PASS
    assert named["LSM"].status is Status.PASS and named["LSM"].details["apparmor"] is True


async def test_confinement_options_need_the_jailer(host: StandinHost) -> None:
    for jailer in (
        {"apparmor_profile": "ironclaw-x"},
        {"selinux_label": "system_u:system_r:ironclaw_jailer_t:s0"},
        {"seccomp_filter": host.images / "vmlinux", "no_seccomp": False},
    ):
        cfg = host.vm_config("h13-unit", rootfs_path=None, jailer=jailer)
        await refused(host, cfg, "applied by the jailer", use_jailer=False)


async def test_seccomp_filter_confined_to_image_dirs(host: StandinHost) -> None:
    outside = host.root / "filter.bpf"
    outside.write_bytes(b"\0" * 8)
    cfg = host.vm_config(
        "h13-unit",
        rootfs_path=None,
        image_dirs=[host.images],
        jailer={"seccomp_filter": outside, "no_seccomp": False},
    )
    await refused(host, cfg, r"jailer\.seccomp_filter .* outside the image dir")
