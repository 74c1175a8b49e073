"""The VM's persistent TAP device inside its namespace, owned by the jail's uid/gid.

The TAP is created here, not by Firecracker: the unprivileged, jailed Firecracker opens
``/dev/net/tun`` itself and calls ``TUNSETIFF`` with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``,
single queue; the kernel allows that for a non-root caller only if the TAP's owner/group
match it.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import struct
from typing import Any

from ...errors import NetworkError
from .kernel import (
    _FIRECRACKER_TAP_FLAGS,
    _IFREQ_SIZE,
    _TUN_DEVICE,
    _TUN_TYPE_TAP,
    _TUNSETGROUP,
    _TUNSETIFF,
    _TUNSETOWNER,
    _TUNSETPERSIST,
    _is_nsfs,
    _require_netns,
    _run_in_netns,
)
from .names import _check_ifname, netns_path
from .netlink import _ensure_address, _find_link, _ipr


def _tun_info(link: Any) -> tuple[str | None, dict[str, Any]]:
    kind = link.get(("linkinfo", "kind"))
    data: dict[str, Any] = {}
    if kind == "tun":
        for key in (
            "IFLA_TUN_TYPE",
            "IFLA_TUN_OWNER",
            "IFLA_TUN_GROUP",
            "IFLA_TUN_MULTI_QUEUE",
            "IFLA_TUN_PERSIST",
        ):
            data[key] = link.get(("linkinfo", "data", key))
    return kind, data


def _create_tap_here(name: str, uid: int, gid: int) -> None:
    """Create (or attach to) the persistent TAP ``name`` in this thread's namespace."""
    fd = os.open(_TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH", name.encode("ascii"), _FIRECRACKER_TAP_FLAGS)
        ifr += b"\0" * (_IFREQ_SIZE - len(ifr))
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
        fcntl.ioctl(fd, _TUNSETOWNER, uid)
        fcntl.ioctl(fd, _TUNSETGROUP, gid)
        fcntl.ioctl(fd, _TUNSETPERSIST, 1)
    finally:
        os.close(fd)


def ensure_tap(netns: str, name: str, uid: int, gid: int, *, host_cidr: str | None = None) -> None:
    """Create a persistent TAP ``name`` inside ``netns`` owned by ``uid``/``gid``; set it up.

    The TAP is single-queue, ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` (what Firecracker asks
    for) and owned by ``uid``/``gid`` (TUNSETOWNER/TUNSETGROUP) so the jailed VMM running
    as that user can attach to it. It is created inside the namespace only (the ioctls run
    in a helper thread that has joined it). If ``host_cidr`` is given (e.g.
    ``"172.30.0.1/30"``) that address is added to the TAP inside the namespace.

    Idempotent: an existing TAP of that name is kept (its owner/group are corrected if
    they differ, which needs no VMM attached to it); a different kind of link with that
    name is an error.
    """
    _check_ifname(name, "TAP")
    for label, value in (("uid", uid), ("gid", gid)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32 - 1:
            raise NetworkError(
                f"invalid {label} {value!r} for TAP {name!r}: use the jail's numeric "
                f"{label} (0 .. 4294967294)"
            )
    iface = None
    if host_cidr is not None:
        try:
            iface = ipaddress.ip_interface(host_cidr)
        except ValueError as exc:
            raise NetworkError(
                f"invalid host_cidr {host_cidr!r} for TAP {name!r}: {exc}; "
                "give an address with prefix length, e.g. '172.30.0.1/30'"
            ) from exc

    _require_netns(netns)
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _ipr(netns) as ipr:
            link = _find_link(ipr, name)
            if link is not None:
                kind, data = _tun_info(link)
                if kind != "tun" or data.get("IFLA_TUN_TYPE") != _TUN_TYPE_TAP:
                    raise NetworkError(
                        f"link {name!r} in network namespace {netns!r} exists but is not "
                        f"a TAP (kind {kind!r}): remove it (remove_tap) or choose another name"
                    )
                if data.get("IFLA_TUN_MULTI_QUEUE"):
                    raise NetworkError(
                        f"TAP {name!r} in network namespace {netns!r} is multi-queue, "
                        "which Firecracker cannot attach to: remove it with remove_tap()"
                    )
                needs_ioctl = (
                    data.get("IFLA_TUN_OWNER") != uid
                    or data.get("IFLA_TUN_GROUP") != gid
                    or not data.get("IFLA_TUN_PERSIST")
                )
            else:
                needs_ioctl = True

            if needs_ioctl:
                try:
                    _run_in_netns(netns, lambda: _create_tap_here(name, uid, gid))
                except OSError as exc:
                    hint = (
                        "a VMM is still attached to it; stop the VM first"
                        if exc.errno == errno.EBUSY
                        else "check that /dev/net/tun exists (modprobe tun) and that we run as root"
                    )
                    raise NetworkError(
                        f"could not create TAP {name!r} owned by {uid}:{gid} in network "
                        f"namespace {netns!r}: {exc}; {hint}"
                    ) from exc

            link = _find_link(ipr, name)
            if link is None:
                raise NetworkError(
                    f"TAP {name!r} did not appear in network namespace {netns!r} after "
                    "creation; check the kernel log (dmesg)"
                )
            _, data = _tun_info(link)
            if data.get("IFLA_TUN_OWNER") != uid or data.get("IFLA_TUN_GROUP") != gid:
                raise NetworkError(
                    f"TAP {name!r} in network namespace {netns!r} is owned by "
                    f"{data.get('IFLA_TUN_OWNER')}:{data.get('IFLA_TUN_GROUP')}, not "
                    f"{uid}:{gid}; remove it with remove_tap() and try again"
                )
            index = link["index"]
            ipr.link("set", index=index, state="up")
            if iface is not None:
                _ensure_address(ipr, index, iface)
    except NetlinkError as exc:
        raise NetworkError(
            f"could not configure TAP {name!r} in network namespace {netns!r}: {exc}"
        ) from exc


def remove_tap(netns: str, name: str) -> None:
    """Delete TAP ``name`` from ``netns``; do nothing if the TAP or the namespace is gone."""
    _check_ifname(name, "TAP")
    path = netns_path(netns)
    if not _is_nsfs(path):
        return
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _ipr(netns) as ipr:
            link = _find_link(ipr, name)
            if link is None:
                return
            kind, data = _tun_info(link)
            if kind != "tun" or data.get("IFLA_TUN_TYPE") != _TUN_TYPE_TAP:
                raise NetworkError(
                    f"refusing to delete link {name!r} in network namespace {netns!r}: it "
                    f"is not a TAP (kind {kind!r}); check the name"
                )
            try:
                ipr.link("del", index=link["index"])
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
    except NetlinkError as exc:
        raise NetworkError(
            f"could not delete TAP {name!r} in network namespace {netns!r}: {exc}"
        ) from exc
