"""Names of a VM's network resources.

The names derived from a VM id (namespace, TAP, guest MAC, veth pair) have one home,
:mod:`ironclaw_orchestrator.names`, and are re-exported here; what is netns-specific and not
derived from an id stays here: where named namespaces live and the rules for a namespace
or interface name given by the caller.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import NetworkError
from ...names import NETNS_PREFIX, guest_mac, netns_name, tap_name, uplink_names

__all__ = [
    "IFNAME_MAX",
    "NETNS_DIR",
    "NETNS_PREFIX",
    "guest_mac",
    "netns_name",
    "netns_path",
    "tap_name",
    "uplink_names",
]

#: Where named network namespaces are bind-mounted (shared with iproute2's ``ip netns``).
NETNS_DIR = Path("/run/netns")

#: Linux IFNAMSIZ is 16 including the terminating NUL.
IFNAME_MAX = 15

_NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _check_netns_name(name: str) -> None:
    if not isinstance(name, str) or not _NETNS_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise NetworkError(
            f"invalid network namespace name {name!r}: use 1-255 characters from "
            "[A-Za-z0-9_.-] (not '.' or '..'), e.g. netns_name(vm_id)"
        )


def _check_ifname(name: str, what: str = "interface") -> None:
    if not isinstance(name, str) or not _IFNAME_RE.fullmatch(name) or name in (".", ".."):
        raise NetworkError(
            f"invalid {what} name {name!r}: Linux interface names are 1-{IFNAME_MAX} "
            "characters; use [A-Za-z0-9_.-] only, e.g. tap_name(vm_id)"
        )


def netns_path(name: str) -> Path:
    """Return the bind-mount path of the named network namespace: ``/run/netns/<name>``.

    This is what the jailer's ``--netns`` takes.
    """
    _check_netns_name(name)
    return NETNS_DIR / name
