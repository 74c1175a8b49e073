"""The opt-in uplink of a VM's namespace: a veth pair, a /30 and a default route.

This module never changes the host's firewall or its global ``ip_forward``: NAT and
forwarding on the host side are left to the operator (see :func:`ensure_uplink`).
"""

from __future__ import annotations

import errno
import ipaddress
import os
from dataclasses import dataclass

from ...errors import NetworkError
from .kernel import _is_nsfs, _require_netns, _run_in_netns
from .names import netns_path, uplink_names
from .netlink import _ensure_address, _find_link, _ipr


@dataclass(frozen=True)
class Uplink:
    """The veth uplink of a VM's namespace, as created by :func:`ensure_uplink`."""

    netns: str
    host_ifname: str
    netns_ifname: str
    host_address: ipaddress.IPv4Interface
    netns_address: ipaddress.IPv4Interface


def _parse_subnet(subnet: str | ipaddress.IPv4Network, vm_id: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except (ValueError, TypeError) as exc:
        raise NetworkError(
            f"invalid uplink subnet {subnet!r} for VM {vm_id!r}: {exc}; give an IPv4 /30 "
            "network such as '172.31.0.0/30'"
        ) from exc
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen != 30:
        raise NetworkError(
            f"invalid uplink subnet {subnet!r} for VM {vm_id!r}: it must be an IPv4 /30 "
            "network such as '172.31.0.0/30'"
        )
    return net


def _write_ns_sysctl(key: str, value: str) -> None:
    with open(f"/proc/sys/{key.replace('.', '/')}", "w", encoding="ascii") as fh:
        fh.write(value)


def ensure_uplink(
    netns: str,
    vm_id: str,
    subnet: str | ipaddress.IPv4Network,
    *,
    forward_in_netns: bool = True,
) -> Uplink:
    """Opt-in outbound path: connect ``netns`` to the host with a veth pair. Idempotent.

    Creates ``icv<hash>`` on the host and ``icu<hash>`` inside the namespace (see
    :func:`uplink_names`), gives the host end the first and the namespace end the second
    address of the IPv4 /30 ``subnet``, brings both up and installs a default route inside
    the namespace via the host end. With ``forward_in_netns`` (default) IPv4 forwarding is
    enabled *inside the namespace only* (``net.ipv4.ip_forward`` is per namespace), so
    guest traffic arriving on the TAP can leave through the uplink.

    Not done here, on purpose (this module never shells out and never touches the host's
    firewall or its global ``ip_forward``): NAT/masquerading and forwarding on the host.
    To let the guest reach further, the operator must, on the host, route the guest's
    subnet via the namespace end, enable forwarding, and masquerade it in an nftables
    table of their own.

    Remove with :func:`remove_uplink` (at VM stop).
    """
    net = _parse_subnet(subnet, vm_id)
    host_if, ns_if = uplink_names(vm_id)
    host_ip, ns_ip = net[1], net[2]
    host_addr = ipaddress.IPv4Interface(f"{host_ip}/{net.prefixlen}")
    ns_addr = ipaddress.IPv4Interface(f"{ns_ip}/{net.prefixlen}")
    path = _require_netns(netns)
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _ipr(None) as host, _ipr(netns) as inner:
            # Refuse a subnet already used by another host interface.
            for msg in host.addr("dump", family=2):
                addr = msg.get("address")
                if addr is None or ipaddress.ip_address(addr) not in net:
                    continue
                owner = host.link("get", index=msg["index"])[0].get("ifname")
                if owner != host_if:
                    raise NetworkError(
                        f"uplink subnet {net} for VM {vm_id!r} overlaps address {addr} of "
                        f"host interface {owner!r}: choose a free /30"
                    )

            host_link = _find_link(host, host_if)
            ns_link = _find_link(inner, ns_if)
            if host_link is not None:
                kind = host_link.get(("linkinfo", "kind"))
                if kind != "veth":
                    raise NetworkError(
                        f"host link {host_if!r} (uplink of VM {vm_id!r}) exists but is not "
                        f"a veth (kind {kind!r}): remove it by hand (ip link del {host_if})"
                    )
                if ns_link is None:
                    # Half a pair (peer elsewhere): start over.
                    host.link("del", index=host_link["index"])
                    host_link = None
            if host_link is None:
                if ns_link is not None:
                    inner.link("del", index=ns_link["index"])
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    host.link(
                        "add",
                        ifname=host_if,
                        kind="veth",
                        peer={"ifname": ns_if, "net_ns_fd": fd},
                    )
                finally:
                    os.close(fd)
                host_link = _find_link(host, host_if)
                ns_link = _find_link(inner, ns_if)
                if host_link is None or ns_link is None:
                    raise NetworkError(
                        f"veth pair {host_if}/{ns_if} for VM {vm_id!r} did not appear "
                        f"after creation (host: {host_link is not None}, netns "
                        f"{netns!r}: {ns_link is not None}); check the kernel log"
                    )

            if host_link is None or ns_link is None:  # for the type checker
                raise NetworkError(f"veth pair {host_if}/{ns_if} for VM {vm_id!r} is missing")
            host_index: int = host_link["index"]
            ns_index: int = ns_link["index"]
            _ensure_address(host, host_index, host_addr)
            host.link("set", index=host_index, state="up")
            _ensure_address(inner, ns_index, ns_addr)
            inner.link("set", index=ns_index, state="up")
            inner.route("replace", dst="0.0.0.0/0", gateway=str(host_ip), oif=ns_index)
    except NetlinkError as exc:
        raise NetworkError(
            f"could not set up uplink {host_if}/{ns_if} ({net}) for VM {vm_id!r} and "
            f"network namespace {netns!r}: {exc}; remove it with remove_uplink() and retry"
        ) from exc

    if forward_in_netns:
        try:
            _run_in_netns(netns, lambda: _write_ns_sysctl("net.ipv4.ip_forward", "1"))
        except OSError as exc:
            raise NetworkError(
                f"could not enable IPv4 forwarding inside network namespace {netns!r}: "
                f"{exc}; check that /proc/sys is writable (we must run as root)"
            ) from exc

    return Uplink(
        netns=netns,
        host_ifname=host_if,
        netns_ifname=ns_if,
        host_address=host_addr,
        netns_address=ns_addr,
    )


def remove_uplink(netns: str, vm_id: str) -> None:
    """Remove the veth uplink of VM ``vm_id``; do nothing if it is already gone.

    Deleting the host end deletes its peer in the namespace (and the route through it).
    """
    host_if, ns_if = uplink_names(vm_id)
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _ipr(None) as host:
            link = _find_link(host, host_if)
            if link is not None:
                kind = link.get(("linkinfo", "kind"))
                if kind != "veth":
                    raise NetworkError(
                        f"refusing to delete host link {host_if!r}: it is not a veth "
                        f"(kind {kind!r}); it was not created by ensure_uplink()"
                    )
                try:
                    host.link("del", index=link["index"])
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:
                        raise
        if _is_nsfs(netns_path(netns)):
            with _ipr(netns) as inner:
                link = _find_link(inner, ns_if)
                if link is not None and link.get(("linkinfo", "kind")) == "veth":
                    try:
                        inner.link("del", index=link["index"])
                    except NetlinkError as exc:
                        if exc.code != errno.ENODEV:
                            raise
    except NetlinkError as exc:
        raise NetworkError(
            f"could not delete uplink {host_if}/{ns_if} of VM {vm_id!r}: {exc}; "
            f"delete it by hand (ip link del {host_if})"
        ) from exc
