"""vm/hostcheck.py, its pure parts: the 107-byte socket budget at each boundary, and uplink
route conflicts."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm import hostcheck
from ironclaw_orchestrator.vm.config import MAX_SOCKET_PATH_BYTES, JailerConfig
from ironclaw_orchestrator.vm.hostcheck import HostRoute

#: "/fc/" + 64-character id + "/root/run/firecracker.socket"
_FIXED = 4 + 64 + len("/root/run/firecracker.socket")


def _budget(over: int) -> hostcheck.Finding:
    """The finding for a chroot base that makes the longest id's socket ``over`` bytes long."""
    base = "/" + "b" * (MAX_SOCKET_PATH_BYTES + over - _FIXED - 1)
    return hostcheck.inspect_socket_budget(JailerConfig(chroot_base_dir=base), "fc")


def test_socket_path_bytes_counts_bytes() -> None:
    assert hostcheck.socket_path_bytes(Path("/a/é")) == 5


def test_check_socket_budget_boundary_and_message() -> None:
    hostcheck.check_socket_budget(Path("/" + "s" * (MAX_SOCKET_PATH_BYTES - 1)))
    path = Path("/" + "s" * (MAX_SOCKET_PATH_BYTES + 2))
    with pytest.raises(ConfigError) as info:
        hostcheck.check_socket_budget(path, "vsock socket")
    assert str(info.value) == (
        f"vsock socket path {path} is 110 bytes, over the 107-byte limit of Unix socket paths "
        "(firecracker would start but nobody could connect): shorten the id (by 3 bytes), the "
        "chroot base or the exec file name"
    )
    with pytest.raises(ConfigError, match=r"^API socket path "):
        hostcheck.check_socket_budget(path)


def test_budget_exactly_full_passes() -> None:
    finding = _budget(0)
    assert finding.level == "pass" and finding.fix == ""
    assert finding.details == {"bytes": 107, "limit": 107}
    assert finding.value.endswith("/fc/<64-char id>/root/run/firecracker.socket: 107 of 107 bytes")


def test_budget_one_over_warns_with_the_longest_id() -> None:
    finding = _budget(1)
    assert finding.level == "warn"
    assert finding.value.endswith(": 108 of 107 bytes; ids up to 63 characters fit")
    assert finding.fix == (
        "keep VM ids to 63 characters, or shorten chroot_base_dir or the exec file name"
    )
    assert finding.details == {"bytes": 108, "limit": 107, "max_id_length": 63}


def test_budget_for_one_character_ids_still_warns() -> None:
    finding = _budget(63)
    assert finding.level == "warn" and finding.details["max_id_length"] == 1
    assert finding.value.endswith("; ids up to 1 characters fit")


@pytest.mark.parametrize("over", [64, 70])
def test_budget_with_no_room_fails(over: int) -> None:
    finding = _budget(over)
    assert finding.level == "fail" and finding.failed
    assert finding.value.endswith(f": {107 + over} of 107 bytes; not even a 1-character id fits")
    assert finding.details["max_id_length"] == 0
    assert finding.fix.startswith("keep VM ids to 0 characters")


def _route(cidr: str, device: str | None = "eth0", table: int | None = None) -> HostRoute:
    return HostRoute(ipaddress.IPv4Network(cidr), device, table)


def test_route_conflicts_ignore_default_routes() -> None:
    net = ipaddress.IPv4Network("10.1.0.0/30")
    routes = [
        _route("0.0.0.0/0"),
        _route("10.0.0.0/8"),
        _route("10.2.0.0/16"),
        _route("10.1.0.2/32"),
    ]
    assert hostcheck.route_conflicts(net, routes) == [routes[1], routes[3]]


def test_a_vpn_split_default_route_is_a_default_route() -> None:
    # OpenVPN's def1: 0.0.0.0/1 + 128.0.0.0/1 instead of 0.0.0.0/0; a /2 is a real clash.
    routes = [_route("0.0.0.0/1", "tun0"), _route("128.0.0.0/1", "tun0"), _route("0.0.0.0/2")]
    assert hostcheck.route_conflicts(ipaddress.IPv4Network("10.1.0.0/30"), routes) == [routes[2]]
    assert hostcheck.route_conflicts(ipaddress.IPv4Network("172.16.0.0/30"), routes) == []
    hostcheck.check_uplink_routes("172.16.0.0/30", routes[:2])


def test_route_text() -> None:
    assert str(_route("10.0.0.0/8")) == "10.0.0.0/8 dev eth0"
    assert str(_route("10.0.0.0/8", None)) == "10.0.0.0/8"
    assert str(_route("10.0.0.0/8", "br0", 254)) == "10.0.0.0/8 dev br0"  # main table: implied
    assert str(_route("10.0.0.0/8", "br0", 100)) == "10.0.0.0/8 dev br0 table 100"


def test_uplink_routes_message_shows_at_most_five() -> None:
    routes = [_route(f"10.9.0.0/{n}", f"d{n}") for n in range(16, 24)]
    with pytest.raises(ConfigError) as info:
        hostcheck.check_uplink_routes("10.9.0.0/30", routes)
    assert str(info.value) == (
        "uplink_subnet 10.9.0.0/30 overlaps the host's route(s) 10.9.0.0/16 dev d16, "
        "10.9.0.0/17 dev d17, 10.9.0.0/18 dev d18, 10.9.0.0/19 dev d19, 10.9.0.0/20 dev d20: "
        "traffic would be routed to the wrong place; pick a /30 no host route covers (see `ip "
        "route show table all`)"
    )
    hostcheck.check_uplink_routes("10.10.0.0/30", routes)  # no overlap: accepted
