"""A VM's own network namespace: nameless, pinned by a probe, reused by the next VM.

A VM without a TAP or uplink (and with an unconfined jailer: see
``jailer._nameless_netns``) gets a namespace with no name: nothing under ``/run/netns``,
no bind mount. What holds it is a *probe*, an rtnetlink socket made inside it when it was
created (a socket stays in the namespace it was made in), and the jailer joins it through
our descriptor of it (:func:`open_netns`, passed as ``/proc/<our pid>/fd/<fd>``: a path into
our descriptor table, which the jailer, as root, may open whatever it does with its own
descriptors; ours stays open until the VM is ready). Once the VMM runs, the VMM and
the probe hold it; when both are gone the kernel frees it. So a crash, ours or the VMM's,
cannot leave it behind, and no mount is made or removed per VM (a mount takes the host's
mount lock, which the jailers' own mounts need too).

Making a namespace and freeing it costs the kernel about 1.4 ms of CPU (the creation runs
every subsystem's per-namespace setup, the release a worker's teardown), more than the
rest of a start's host work. So a VM's namespace is handed back here when it stops, if it
holds nothing a later VM could notice:

* only VMs without a TAP or uplink have one: their namespace was never configured,
  only the jailer and Firecracker ran inside, and neither can change it (the VMM runs
  under the jail uid without capabilities; a namespace owned by the host's user namespace
  takes ``CAP_NET_ADMIN`` there to add a link, an address, a route, a rule or a sysctl);
* its processes are gone: stop reaped the VMM, whose PID namespace took every process in
  it along, and the VM's cgroups are removed (an ``rmdir`` fails while a task is inside);
  the sockets they held died with them. A failed start never returns its namespace;
* checked anyway before it is kept: the namespace holds exactly one link, the loopback,
  and it is down, as the kernel made it.

What this cannot see: a process from outside (``nsenter --net=/proc/<vmm pid>/ns/net``, a
sidecar) that entered the namespace and outlives the VM. Hosts that do that set the pool
to 0.

At most ``IRONCLAW_NETNS_POOL`` namespaces (default 32) wait idle; ``0`` turns reuse off,
so every VM gets a namespace the kernel has just made. A forked child starts empty.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading

from ...errors import ConfigError, NetworkError

__all__ = [
    "DEFAULT_POOL_SIZE",
    "POOL_ENV",
    "NetnsPool",
    "holds_only_lo_down",
    "netns_pool",
    "new_probe",
    "open_netns",
]

POOL_ENV = "IRONCLAW_NETNS_POOL"
DEFAULT_POOL_SIZE = 32

# <linux/sockios.h>: an fd of the socket's network namespace (Linux 4.9+).
_SIOCGSKNS = 0x894C
# <linux/netlink.h>, <linux/rtnetlink.h>, <net/if.h>
_NETLINK_ROUTE = 0
_NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWLINK, _RTM_GETLINK = 16, 18
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFF_UP, _IFF_LOOPBACK = 0x1, 0x8


def new_probe() -> socket.socket:
    """An rtnetlink socket in the calling thread's network namespace (close-on-exec)."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)


def open_netns(probe: socket.socket) -> int:
    """A new descriptor of the probe's network namespace (close-on-exec): ``SIOCGSKNS``."""
    try:
        fd: int = fcntl.ioctl(probe.fileno(), _SIOCGSKNS)
    except OSError as exc:
        raise NetworkError(
            f"could not open a VM's network namespace from its socket (SIOCGSKNS): {exc}; "
            "it needs Linux 4.9 or later and CAP_NET_ADMIN (run as root)"
        ) from exc
    return fd


def _links(probe: socket.socket) -> list[tuple[int, int]]:
    """``(ifindex, flags)`` of every link in the probe's namespace (an RTM_GETLINK dump)."""
    request = _NLMSG_HDR.pack(
        _NLMSG_HDR.size + _IFINFOMSG.size, _RTM_GETLINK, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
    ) + _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    # Never waits: the kernel answers a dump inside send() and continues it inside recv(),
    # so a reply that is not there at once (BlockingIOError) means something is wrong.
    probe.setblocking(False)
    probe.send(request)
    links: list[tuple[int, int]] = []
    while True:
        data = probe.recv(65536)
        offset = 0
        while offset + _NLMSG_HDR.size <= len(data):
            length, kind, _flags, seq, _pid = _NLMSG_HDR.unpack_from(data, offset)
            if length < _NLMSG_HDR.size or seq != 1:
                raise OSError(errno.EPROTO, "unexpected rtnetlink message")
            if kind == _NLMSG_DONE:
                return links
            if kind == _NLMSG_ERROR:
                raise OSError(errno.EPROTO, "rtnetlink dump refused")
            if kind == _RTM_NEWLINK:
                if length < _NLMSG_HDR.size + _IFINFOMSG.size:
                    raise OSError(errno.EPROTO, "short RTM_NEWLINK")
                _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(
                    data, offset + _NLMSG_HDR.size
                )
                links.append((index, flags))
            offset += (length + 3) & ~3


def holds_only_lo_down(probe: socket.socket) -> bool:
    """Whether the probe's namespace is as the kernel made it: one link, ``lo``, down."""
    try:
        links = _links(probe)
    except (OSError, struct.error):
        return False
    return len(links) == 1 and links[0][1] & (_IFF_LOOPBACK | _IFF_UP) == _IFF_LOOPBACK


def _pool_size() -> int:
    value = os.environ.get(POOL_ENV, "").strip()
    if not value:
        return DEFAULT_POOL_SIZE
    if not value.isdecimal():  # isdigit() takes "²", which int() refuses
        raise ConfigError(
            f"{POOL_ENV}={value!r} is not a whole number: set it to how many finished "
            f"VMs' network namespaces to keep for reuse ({DEFAULT_POOL_SIZE} if unset; 0 "
            "turns reuse off)"
        )
    return int(value)


class NetnsPool:
    """Idle VM network namespaces of this process, each pinned by its probe socket."""

    def __init__(self, size: int | None = None) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        #: Namespaces handed out again (a work count for tests).
        self.reused = 0

    @property
    def size(self) -> int:
        """How many namespaces may wait idle (``IRONCLAW_NETNS_POOL``, read on first use:
        ``ConfigError`` if it is not a whole number); 0: no reuse."""
        if self._size is None:
            self._size = _pool_size()
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value

    def __len__(self) -> int:
        return len(self._idle)

    def take(self) -> socket.socket | None:
        """An idle namespace's probe (the namespace is the caller's now), or ``None``."""
        with self._lock:
            if not self._idle:
                return None
            self.reused += 1
            return self._idle.pop()

    def keep(self, probe: socket.socket) -> bool:
        """Take ``probe``'s namespace back for a later VM, if there is room and it passes
        :func:`holds_only_lo_down`; else close the probe (and the namespace goes once the
        VMM is gone too)."""
        with self._lock:
            room = len(self._idle) < self.size
        if room and holds_only_lo_down(probe):
            with self._lock:
                if len(self._idle) < self.size:
                    self._idle.append(probe)
                    return True
        probe.close()
        return False

    def close_idle(self) -> None:
        """Let the kernel free every idle namespace now."""
        with self._lock:
            idle, self._idle = self._idle, []
        for probe in idle:
            probe.close()

    def _after_fork_in_child(self) -> None:
        # The parent keeps handing these out: the child must never hand one out too.
        self._lock = threading.Lock()
        idle, self._idle = self._idle, []
        for probe in idle:
            probe.close()


#: The process's pool (what start and stop use).
netns_pool = NetnsPool()
os.register_at_fork(after_in_child=lambda: netns_pool._after_fork_in_child())
