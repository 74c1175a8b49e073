"""Input checked against the host: RAM, routes, netns files (``vm.hostcheck``, ``vm.inputs``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm import hostcheck, hostroutes
from ironclaw_orchestrator.vm.config import VmConfig
from ironclaw_orchestrator.vm.hostcheck import (
    HostRoute,
    check_guest_memory,
    check_netns_path,
    check_uplink_routes,
    host_memory_mib,
    route_conflicts,
)
from ironclaw_orchestrator.vm.hostroutes import _routes_proc
from ironclaw_orchestrator.vm.inputs import check_vm_inputs


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def test_guest_memory_is_checked_against_memtotal(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        2048000 kB\nMemFree:  1000 kB\n")
    assert host_memory_mib(meminfo) == 2000
    check_guest_memory(2000, meminfo)
    with pytest.raises(ConfigError, match=r"memory_mb=2001 is more than this host's RAM \(2000"):
        check_guest_memory(2001, meminfo)
    check_guest_memory(1 << 20, tmp_path / "missing")  # unknown RAM: the model bound holds


def test_route_conflicts_ignore_default_routes() -> None:
    routes = [
        HostRoute(net("0.0.0.0/0"), "eth0", 254),
        HostRoute(net("192.168.0.0/16"), "br0", 254),
        HostRoute(net("10.1.2.3/32"), "eth1", 255),
        HostRoute(net("100.64.0.0/10"), "wg0", 100),
    ]
    assert route_conflicts(net("10.200.0.0/30"), routes) == []
    assert route_conflicts(net("192.168.7.4/30"), routes) == [routes[1]]
    assert route_conflicts(net("10.1.2.0/30"), routes) == [routes[2]]
    with pytest.raises(ConfigError, match=r"100\.64\.0\.0/10 dev wg0 table 100"):
        check_uplink_routes("100.64.1.0/30", routes)
    check_uplink_routes("10.200.0.0/30", routes)


def test_proc_net_route_fallback_parses_the_main_table(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    assert [(str(r.network), r.device) for r in _routes_proc(table)] == [
        ("0.0.0.0/0", "eth0"),
        ("192.0.2.0/24", "eth0"),
    ]


def test_host_routes_are_read_from_every_table() -> None:
    routes = hostcheck.host_ipv4_routes()
    # The local table always holds loopback: proof that more than the main table is read.
    assert any(r.network.subnet_of(net("127.0.0.0/8")) and r.table == 255 for r in routes)


def test_netns_path_must_be_a_network_namespace(tmp_path: Path) -> None:
    check_netns_path("/proc/self/ns/net")
    with pytest.raises(ConfigError, match=r"jailer\.netns .* does not exist"):
        check_netns_path(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="is not a network namespace"):
        check_netns_path("/proc/self/ns/uts")
    with pytest.raises(ConfigError, match="is not a network namespace"):
        check_netns_path(str(tmp_path))


def test_check_vm_inputs_names_each_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IRONCLAW_IMAGE_DIRS", raising=False)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    base = {"kernel_path": str(kernel), "rootfs_path": None, "memory_mb": 128}
    check_vm_inputs(VmConfig(**base))
    monkeypatch.setattr(hostcheck, "host_memory_mib", lambda *a: 1000)
    with pytest.raises(ConfigError, match="memory_mb=1001"):
        check_vm_inputs(VmConfig(**{**base, "memory_mb": 1001}))
    with pytest.raises(ConfigError, match="kernel_path"):
        check_vm_inputs(VmConfig(**base, image_dirs=[str(tmp_path / "elsewhere")]))
    with pytest.raises(ConfigError, match=r"jailer\.netns"):
        check_vm_inputs(VmConfig(**base, jailer={"netns": "/etc/hostname"}))
    monkeypatch.setattr(
        hostroutes, "host_ipv4_routes", lambda: [HostRoute(net("10.9.0.0/16"), "eth0")]
    )
    with pytest.raises(ConfigError, match=r"uplink_subnet 10\.9\.8\.0/30 overlaps"):
        check_vm_inputs(VmConfig(**base, uplink_subnet="10.9.8.0/30"))
