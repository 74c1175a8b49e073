"""Network namespaces, TAP devices and the opt-in uplink of a microVM (netlink via pyroute2).

Every VM gets its own network namespace, which the jailer joins with ``--netns <path>``. A
VM without a TAP or uplink gets one with no name (:func:`create_vm_netns`, reused through
:mod:`.pool`); one with a TAP or uplink (or a jailer under an LSM profile) gets
``ironclaw-<vm_id>`` (``/run/netns/<name>``, the same place ``ip netns`` uses), set up by name.
Inside it lives the VM's TAP device: a *persistent* TAP created here, owned by the jail's
uid/gid, so that the unprivileged, jailed Firecracker can attach to it by name.

By default the namespace has no way out: only ``lo`` and the TAP. Reaching anything
beyond needs the explicit opt-in :func:`ensure_uplink` (a veth pair with one end in the
namespace, a /30 and a default route inside the namespace), undone by
:func:`remove_uplink`. This package never changes the host's firewall or its global
``ip_forward``.

All functions are synchronous and quick. They use pyroute2's synchronous ``IPRoute``,
which runs its own event loop, so call them from a thread without a running event loop
(e.g. ``await asyncio.to_thread(ensure_netns, name)``), never directly from a coroutine.
All errors are :class:`~ironclaw_orchestrator.errors.NetworkError`.

Layout (each module one concept; dependencies point down the list):

- :mod:`.names`: where namespaces live, name rules; the names derived from a VM id
  (namespace, TAP, MAC, veth pair) are :mod:`ironclaw_orchestrator.names`, re-exported.
- :mod:`.kernel`: the TUN device, ioctl numbers, libc ``setns``/``unshare``/``mount``,
  running a function in a (reused) helper thread that has joined a namespace.
- :mod:`.netlink`: rtnetlink sockets into the host or a namespace, link lookup.
- :mod:`.namespace`: :func:`ensure_netns`, :func:`claim_netns_name`,
  :func:`create_claimed_netns`, :func:`create_vm_netns`, :func:`remove_netns`, ...
- :mod:`.pool`: a nameless VM namespace's probe, :data:`netns_pool` (a finished VM's
  namespace kept for the next VM).
- :mod:`.tap`: :func:`ensure_tap`, :func:`remove_tap`.
- :mod:`.uplink`: :func:`ensure_uplink`, :func:`remove_uplink`.
- :mod:`.forkguard`: keeps pyroute2's forked helpers off our asyncio wakeup fd (installed
  when this package is imported).
"""

from __future__ import annotations

from . import forkguard as _forkguard  # noqa: F401  (installs the at-fork hook)
from .kernel import TUN_DEVICE
from .names import (
    IFNAME_MAX,
    NETNS_DIR,
    NETNS_PREFIX,
    guest_mac,
    netns_name,
    netns_path,
    tap_name,
    uplink_names,
)
from .namespace import (
    claim_netns_name,
    create_claimed_netns,
    create_vm_netns,
    ensure_netns,
    interfaces_in,
    list_netns,
    netns_inode,
    remove_netns,
)
from .pool import NetnsPool, netns_pool, open_netns
from .tap import ensure_tap, remove_tap
from .uplink import Uplink, ensure_uplink, remove_uplink

__all__ = [
    "IFNAME_MAX",
    "NETNS_DIR",
    "NETNS_PREFIX",
    "TUN_DEVICE",
    "NetnsPool",
    "Uplink",
    "claim_netns_name",
    "create_claimed_netns",
    "create_vm_netns",
    "ensure_netns",
    "ensure_tap",
    "ensure_uplink",
    "guest_mac",
    "interfaces_in",
    "list_netns",
    "netns_inode",
    "netns_name",
    "netns_path",
    "netns_pool",
    "open_netns",
    "remove_netns",
    "remove_tap",
    "remove_uplink",
    "tap_name",
    "uplink_names",
]
