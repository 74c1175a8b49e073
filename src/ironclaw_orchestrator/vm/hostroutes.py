"""The host's IPv4 routes, and the check that a VM's uplink subnet clashes with none of them.

Read-only, run before anything is made (:func:`check_uplink_routes`); ``vm.hostcheck``
re-exports these names.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, HostError

PROC_NET_ROUTE = Path("/proc/net/route")


@dataclass(frozen=True)
class HostRoute:
    """An IPv4 route of the host (any routing table)."""

    network: ipaddress.IPv4Network
    device: str | None = None
    table: int | None = None

    def __str__(self) -> str:
        dev = f" dev {self.device}" if self.device else ""
        table = f" table {self.table}" if self.table not in (None, 254) else ""
        return f"{self.network}{dev}{table}"


def _ifname(index: int | None) -> str | None:
    if not index:
        return None
    try:
        return socket.if_indextoname(index)
    except OSError:
        return str(index)


def _routes_netlink() -> list[HostRoute]:
    from pyroute2 import IPRoute

    routes = []
    with IPRoute() as ipr:
        for msg in ipr.route("dump", family=socket.AF_INET):
            dst = msg.get_attr("RTA_DST") or "0.0.0.0"
            net = ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False)
            table = msg.get_attr("RTA_TABLE") or msg["table"]
            routes.append(HostRoute(net, _ifname(msg.get_attr("RTA_OIF")), table))
    return routes


def _routes_proc(path: Path = PROC_NET_ROUTE) -> list[HostRoute]:
    """The main table from ``/proc/net/route`` (little-endian hex destination and mask)."""
    routes = []
    for line in path.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        dst = ipaddress.IPv4Address(int(fields[1], 16).to_bytes(4, "little"))
        mask = ipaddress.IPv4Address(int(fields[7], 16).to_bytes(4, "little"))
        routes.append(HostRoute(ipaddress.IPv4Network(f"{dst}/{mask}", strict=False), fields[0]))
    return routes


def host_ipv4_routes() -> list[HostRoute]:
    """Every IPv4 route of the host, all tables (netlink); ``/proc/net/route`` as fallback.

    pyroute2's synchronous client runs an event loop of its own, so it is used from a
    short-lived worker thread (callers may be inside a running loop).
    """
    try:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="routes") as pool:
            return pool.submit(_routes_netlink).result(timeout=30)
    except Exception:  # netlink refused (seccomp, no NETLINK_ROUTE): the main table will do
        try:
            return _routes_proc()
        except (OSError, ValueError) as exc:
            raise HostError(f"cannot read the host's routes: {exc}") from exc


def route_conflicts(subnet: ipaddress.IPv4Network, routes: Sequence[HostRoute]) -> list[HostRoute]:
    """The routes ``subnet`` overlaps, default routes aside (they overlap everything).

    A /1 counts as a default route: VPN clients (OpenVPN's ``def1``, WireGuard's
    ``AllowedIPs = 0.0.0.0/0`` on some setups) replace the default route by ``0.0.0.0/1`` +
    ``128.0.0.0/1``, which would otherwise refuse every uplink subnet. No network is that big.
    """
    return [r for r in routes if r.network.prefixlen > 1 and r.network.overlaps(subnet)]


def check_uplink_routes(subnet: str, routes: Sequence[HostRoute] | None = None) -> None:
    """Refuse an uplink /30 that overlaps any host route or address (all routing tables)."""
    net = ipaddress.IPv4Network(subnet)
    clashes = route_conflicts(net, host_ipv4_routes() if routes is None else routes)
    if clashes:
        shown = ", ".join(str(r) for r in clashes[:5])
        raise ConfigError(
            f"uplink_subnet {subnet} overlaps the host's route(s) {shown}: traffic would be "
            "routed to the wrong place; pick a /30 no host route covers (see `ip route show "
            "table all`)"
        )
