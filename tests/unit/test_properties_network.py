"""Properties of the uplink subnet and host-route checks (vm/config.py, vm/netns/uplink.py,
vm/hostcheck.py) and of namespace names (vm/netns/names.py)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from property_strategies import ipv4_interfaces

from ironclaw_orchestrator.errors import ConfigError, NetworkError
from ironclaw_orchestrator.vm.config import VmConfig
from ironclaw_orchestrator.vm.hostcheck import HostRoute, check_uplink_routes, route_conflicts
from ironclaw_orchestrator.vm.netns import names as ns_names
from ironclaw_orchestrator.vm.netns.uplink import _parse_subnet

_SPECIAL = [
    ipaddress.IPv4Network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
]


def _documented_uplink(text: str) -> bool:
    """README: an IPv4 /30 (network address, not a host's) outside loopback, multicast,
    link-local, reserved (240/4) and 0.0.0.0/8."""
    try:
        net = ipaddress.IPv4Network(text)  # strict: host bits must be zero
    except ValueError:
        return False
    return net.prefixlen == 30 and not any(net.overlaps(s) for s in _SPECIAL)


uplinks = st.one_of(ipv4_interfaces(min_prefix=28, max_prefix=32), ipv4_interfaces())


@given(uplinks)
def test_uplink_subnet_accepts_exactly_the_documented_domain(text: str) -> None:
    tap = "192.0.2.1/30"  # TEST-NET-1: never overlaps what is drawn unless drawn there
    if ipaddress.IPv4Network(text, strict=False).overlaps(ipaddress.IPv4Network("192.0.2.0/30")):
        return
    if _documented_uplink(text):
        assert VmConfig(uplink_subnet=text, tap_host_cidr=tap).uplink_subnet == text
    else:
        with pytest.raises(ConfigError, match="uplink_subnet"):
            VmConfig(uplink_subnet=text, tap_host_cidr=tap)


@given(uplinks)
def test_an_accepted_subnet_is_one_the_uplink_can_set_up(text: str) -> None:
    """The config's rule and ``ensure_uplink``'s agree: host end and namespace end get the two
    usable addresses of the /30."""
    try:
        VmConfig(uplink_subnet=text, tap_host_cidr="192.0.2.1/30")
    except ConfigError:
        return
    net = _parse_subnet(text, "vm1")
    host, inner = net[1], net[2]
    usable = set(net.hosts())
    assert {host, inner} == usable
    assert host != inner


@given(
    ipv4_interfaces(min_prefix=8, max_prefix=30),
    st.integers(0, 2**30 - 1).map(lambda n: ipaddress.IPv4Network((n << 2, 30))),
)
def test_uplink_never_overlaps_the_tap_network(tap: str, uplink: ipaddress.IPv4Network) -> None:
    try:
        VmConfig(tap_host_cidr=tap)
    except ConfigError:
        return
    if not _documented_uplink(str(uplink)):
        return
    overlaps = ipaddress.IPv4Interface(tap).network.overlaps(uplink)
    if overlaps:
        with pytest.raises(ConfigError, match="overlaps tap_host_cidr"):
            VmConfig(tap_host_cidr=tap, uplink_subnet=str(uplink))
    else:
        VmConfig(tap_host_cidr=tap, uplink_subnet=str(uplink))


@given(st.one_of(st.text(max_size=20), ipv4_interfaces()))
def test_parse_subnet_refuses_all_but_ipv4_slash_30(text: str) -> None:
    try:
        net = _parse_subnet(text, "vm1")
    except NetworkError as exc:
        assert "vm1" in str(exc) and "/30" in str(exc)
        return
    assert isinstance(net, ipaddress.IPv4Network) and net.prefixlen == 30


routes = st.lists(
    st.builds(
        HostRoute,
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
            lambda t: ipaddress.IPv4Network(t, strict=False)
        ),
        st.sampled_from(["eth0", "lo", None]),
    ),
    max_size=6,
)


@given(st.integers(0, 2**30 - 1).map(lambda n: ipaddress.IPv4Network((n << 2, 30))), routes)
def test_uplink_route_check_refuses_exactly_overlaps(
    subnet: ipaddress.IPv4Network, table: list[HostRoute]
) -> None:
    """Any host route the /30 overlaps is a conflict, except default routes (0/0, and the
    0/1 + 128/1 pair VPN clients put in its place)."""
    clashes = route_conflicts(subnet, table)
    for r in table:
        overlap = r.network.prefixlen > 1 and (
            subnet.network_address in r.network or r.network.network_address in subnet
        )
        assert (r in clashes) is overlap
    if clashes:
        with pytest.raises(ConfigError, match=f"uplink_subnet {subnet} overlaps"):
            check_uplink_routes(str(subnet), table)
    else:
        check_uplink_routes(str(subnet), table)


@given(st.one_of(st.text(max_size=260), st.text("abc.-_", max_size=5)))
def test_netns_names_accepted_are_single_safe_path_components(name: str) -> None:
    try:
        path = ns_names.netns_path(name)
    except NetworkError as exc:
        assert "network namespace name" in str(exc)
        return
    assert path.parent == ns_names.NETNS_DIR  # never escapes /run/netns
    assert path.name == name and name not in (".", "..")
    assert 1 <= len(name.encode()) <= 255
