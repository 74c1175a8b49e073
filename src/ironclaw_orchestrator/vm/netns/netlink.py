"""rtnetlink sockets (pyroute2's synchronous ``IPRoute``) into the host or a named namespace.

pyroute2's sync API runs its own event loop, so these helpers refuse to run on a thread
that already runs one; netlink sockets into a namespace are opened by pyroute2
(``IPRoute(netns=...)``).

pyroute2 is imported by the functions that use it, never at module level: importing it
costs about 200 ms (and psutil), and a VM without a TAP or uplink never needs it (its
namespace is made and removed with plain syscalls), nor does any command that does not
start a VM.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ...errors import NetworkError
from .kernel import _require_netns


def _refuse_running_loop(action: str) -> None:
    """Raise if this thread runs an asyncio loop (pyroute2's sync API needs its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise NetworkError(
        f"could not {action}: called from a thread with a running asyncio event loop; "
        "these functions are synchronous (pyroute2 runs its own loop), call them via "
        "asyncio.to_thread() from async code"
    )


@contextmanager
def _ipr(name: str | None) -> Iterator[Any]:
    """Open an rtnetlink socket in the named namespace (``None``: the caller's namespace)."""
    where = "the host namespace" if name is None else f"network namespace {name!r}"
    _refuse_running_loop(f"open a netlink socket in {where}")
    path = None if name is None else _require_netns(name)
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr = IPRoute() if path is None else IPRoute(netns=str(path), flags=0)
    except (OSError, NetlinkError, RuntimeError) as exc:
        raise NetworkError(
            f"could not open a netlink socket in {where}: {exc}; check that it still "
            "exists and that we run as root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        ) from exc
    try:
        yield ipr
    finally:
        ipr.close()


def _find_link(ipr: Any, ifname: str) -> Any | None:
    """Return the link message for ``ifname``, or None if there is no such link."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        links = ipr.link("get", ifname=ifname)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return links[0] if links else None


def _ensure_address(
    ipr: Any, index: int, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    for msg in ipr.addr("dump", index=index):
        if msg.get("address") == str(iface.ip) and msg["prefixlen"] == iface.network.prefixlen:
            return
    try:
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
