"""Real network namespaces, TAPs and veth uplinks (needs root and /dev/net/tun).

Every test cleans up in ``finally``: no namespace named ``ironclaw-*`` and no ``icl``/``icv``
link may be left behind on the host.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import secrets
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from ironclaw_orchestrator.errors import NetworkError
from ironclaw_orchestrator.vm import netns
from ironclaw_orchestrator.vm.netns import namespace
from ironclaw_orchestrator.vm.netns.kernel import _run_in_netns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, TAPs)"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun"),
]

JAIL_UID = 64000
JAIL_GID = 64000

# What Firecracker does when it attaches: TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
_TUNSETIFF = 0x400454CA
_FC_FLAGS = 0x0002 | 0x1000 | 0x4000


def _host_links() -> set[str]:
    with IPRoute() as ipr:
        return {str(m.get("ifname")) for m in ipr.link("dump")}


def _tun_attr(netns_name: str, ifname: str, attr: str) -> object:
    with IPRoute(netns=str(netns.netns_path(netns_name)), flags=0) as ipr:
        link = ipr.link("get", ifname=ifname)[0]
        return link.get(("linkinfo", "data", attr))


def _link(netns_name: str, ifname: str) -> object:
    with IPRoute(netns=str(netns.netns_path(netns_name)), flags=0) as ipr:
        return ipr.link("get", ifname=ifname)[0]


@pytest.fixture
def vm_id() -> Iterator[str]:
    """A random VM id; afterwards its namespace and links are gone (checked and forced)."""
    vid = "t-" + secrets.token_hex(6)
    before = _host_links()
    name = netns.netns_name(vid)
    try:
        yield vid
    finally:
        try:
            netns.remove_uplink(name, vid)
        finally:
            netns.remove_netns(name)
        assert name not in netns.list_netns()
        assert not netns.netns_path(name).exists()
        leftovers = {n for n in _host_links() - before if n.startswith(("icl", "icv", "icu"))}
        assert not leftovers, f"links left on the host: {leftovers}"


def _attach_as(path: Path, tap: str, uid: int, gid: int) -> int:
    """Fork; the child joins ``path``, drops to uid/gid and attaches to ``tap`` the way
    Firecracker does. Returns 0 on success, else the errno of the failure."""
    pid = os.fork()
    if pid == 0:  # child: only raw syscalls, then _exit
        code = 100
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY)
            if libc.setns(fd, 0x40000000) != 0:
                os._exit(101)
            tun = os.open("/dev/net/tun", os.O_RDWR)  # the jail gives the VMM its own node
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            ifr = struct.pack("16sH22x", tap.encode(), _FC_FLAGS)
            try:
                fcntl.ioctl(tun, _TUNSETIFF, ifr)
                code = 0
            except OSError as exc:
                code = exc.errno or 102
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_netns_tap_lifecycle(vm_id: str) -> None:
    name = netns.netns_name(vm_id)
    tap = netns.tap_name(vm_id)
    path = netns.ensure_netns(name)
    assert path == Path("/run/netns") / name
    assert name in netns.list_netns()
    assert netns.interfaces_in(name) == ["lo"]
    assert _link(name, "lo").get("flags") & 1, "lo must be UP"  # type: ignore[attr-defined]
    assert netns.netns_inode(path) != os.stat("/proc/self/ns/net").st_ino

    netns.ensure_tap(name, tap, JAIL_UID, JAIL_GID, host_cidr="172.30.0.1/30")
    try:
        assert netns.interfaces_in(name) == ["lo", tap]
        assert tap not in _host_links()
        assert _tun_attr(name, tap, "IFLA_TUN_OWNER") == JAIL_UID
        assert _tun_attr(name, tap, "IFLA_TUN_GROUP") == JAIL_GID
        assert _tun_attr(name, tap, "IFLA_TUN_TYPE") == 2  # tap
        assert _tun_attr(name, tap, "IFLA_TUN_PERSIST") == 1
        assert not _tun_attr(name, tap, "IFLA_TUN_MULTI_QUEUE")
        link = _link(name, tap)
        assert link.get("flags") & 1, "tap must be UP"  # type: ignore[attr-defined]
        with IPRoute(netns=str(path), flags=0) as ipr:
            addrs = {(a.get("address"), a["prefixlen"]) for a in ipr.addr("dump")}
        assert ("172.30.0.1", 30) in addrs

        # The unprivileged VMM can attach exactly as Firecracker does; another uid cannot.
        assert _attach_as(path, tap, JAIL_UID, JAIL_GID) == 0
        assert _attach_as(path, tap, JAIL_UID + 1, JAIL_GID + 1) == errno.EPERM
    finally:
        netns.remove_tap(name, tap)
    assert netns.interfaces_in(name) == ["lo"]
    netns.remove_netns(name)
    assert name not in netns.list_netns()
    assert not path.exists()


def test_idempotent(vm_id: str) -> None:
    name = netns.netns_name(vm_id)
    tap = netns.tap_name(vm_id)
    p1 = netns.ensure_netns(name)
    ino = netns.netns_inode(p1)
    p2 = netns.ensure_netns(name)
    assert p1 == p2 and netns.netns_inode(p2) == ino, "ensure_netns must not recreate"
    netns.ensure_tap(name, tap, JAIL_UID, JAIL_GID, host_cidr="172.30.0.1/30")
    netns.ensure_tap(name, tap, JAIL_UID, JAIL_GID, host_cidr="172.30.0.1/30")
    assert netns.interfaces_in(name) == ["lo", tap]
    # a second call with another owner fixes the ownership
    netns.ensure_tap(name, tap, JAIL_UID + 5, JAIL_GID + 5)
    assert _tun_attr(name, tap, "IFLA_TUN_OWNER") == JAIL_UID + 5
    assert _tun_attr(name, tap, "IFLA_TUN_GROUP") == JAIL_GID + 5
    netns.remove_tap(name, tap)
    netns.remove_tap(name, tap)
    assert netns.interfaces_in(name) == ["lo"]
    netns.remove_netns(name)
    netns.remove_netns(name)
    netns.remove_tap(name, tap)  # namespace gone: still no error
    assert name not in netns.list_netns()


def test_tap_needs_existing_netns(vm_id: str) -> None:
    name = netns.netns_name(vm_id)
    with pytest.raises(NetworkError, match="does not exist"):
        netns.ensure_tap(name, netns.tap_name(vm_id), JAIL_UID, JAIL_GID)
    assert name not in netns.list_netns(), "must not create the namespace implicitly"
    with pytest.raises(NetworkError, match="does not exist"):
        netns.interfaces_in(name)


def test_stale_netns_file_is_replaced(vm_id: str) -> None:
    name = netns.netns_name(vm_id)
    path = netns.netns_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    with pytest.raises(NetworkError, match="not a mounted network namespace"):
        netns.interfaces_in(name)
    netns.ensure_netns(name)
    assert netns.interfaces_in(name) == ["lo"]


def _thread_netns_ino() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def test_callable_via_to_thread_and_caller_stays_home(vm_id: str) -> None:
    name = netns.netns_name(vm_id)
    tap = netns.tap_name(vm_id)
    home = _thread_netns_ino()

    def worker() -> tuple[int, int, list[str]]:
        before = _thread_netns_ino()
        netns.ensure_tap(name, tap, JAIL_UID, JAIL_GID)
        return before, _thread_netns_ino(), netns.interfaces_in(name)

    async def main() -> tuple[int, int, list[str]]:
        await asyncio.to_thread(netns.ensure_netns, name)
        try:
            return await asyncio.to_thread(worker)
        finally:
            await asyncio.to_thread(netns.remove_tap, name, tap)

    before, after, links = asyncio.run(main())
    assert links == ["lo", tap]
    assert before == after == home, "the calling thread must never change namespace"
    assert _thread_netns_ino() == home
    assert tap not in _host_links()


def test_uplink_created_and_removed(vm_id: str) -> None:
    name = netns.netns_name(vm_id)
    host_if, ns_if = netns.uplink_names(vm_id)
    fwd = Path("/proc/sys/net/ipv4/ip_forward")
    host_forward_before = fwd.read_text()
    netns.ensure_netns(name)
    try:
        up = netns.ensure_uplink(name, vm_id, "172.31.250.0/30")
        up2 = netns.ensure_uplink(name, vm_id, "172.31.250.0/30")
        assert up == up2
        assert (up.host_ifname, up.netns_ifname) == (host_if, ns_if)
        assert str(up.host_address) == "172.31.250.1/30"
        assert str(up.netns_address) == "172.31.250.2/30"
        assert host_if in _host_links() and ns_if not in _host_links()
        assert netns.interfaces_in(name) == ["lo", ns_if]
        with IPRoute(netns=str(netns.netns_path(name)), flags=0) as ipr:
            routes = [r for r in ipr.route("dump", family=2) if r.get("dst_len") == 0]
            assert any(r.get("gateway") == "172.31.250.1" for r in routes), routes
            addrs = {a.get("address") for a in ipr.addr("dump", family=2)}
            assert "172.31.250.2" in addrs
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=host_if)[0]
            addrs = {a.get("address") for a in ipr.addr("dump", index=idx)}
            assert "172.31.250.1" in addrs
        # forwarding is switched on inside the namespace only
        assert fwd.read_text() == host_forward_before
        assert _run_in_netns(name, fwd.read_text).strip() == "1"

        # traffic really flows: from inside the namespace to a listener on the host end
        with socket.create_server(("172.31.250.1", 0)) as server:
            port = server.getsockname()[1]

            def connect_from_inside() -> str:
                with socket.create_connection(("172.31.250.1", port), timeout=5) as c:
                    return str(c.getsockname()[0])

            assert _run_in_netns(name, connect_from_inside) == "172.31.250.2"
            conn, peer = server.accept()
            conn.close()
            assert peer[0] == "172.31.250.2"

        # the overlap check refuses a /30 already on the host (our own link is fine)
        with pytest.raises(NetworkError, match="overlaps"):
            netns.ensure_uplink(name, "other-" + vm_id[2:], "172.31.250.0/30")
    finally:
        netns.remove_uplink(name, vm_id)
    netns.remove_uplink(name, vm_id)
    assert host_if not in _host_links()
    assert netns.interfaces_in(name) == ["lo"]
    assert fwd.read_text() == host_forward_before


def _mountinfo_under_netns() -> list[str]:
    """Mount points below /run/netns (the /run/netns mount itself excluded)."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            point = line.split()[4]
            if point.startswith(str(netns.NETNS_DIR) + "/"):
                points.append(point)
    return points


def test_fast_path_needs_no_fork_and_matches_ip_netns(
    vm_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    name = netns.netns_name(vm_id)
    path = netns.netns_path(name)
    home = _thread_netns_ino()

    def no_fork() -> int:
        raise AssertionError("ensure_netns must not fork")

    def no_pyroute2(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fast path must not use pyroute2")

    with monkeypatch.context() as m:
        m.setattr(os, "fork", no_fork)
        m.setattr(pr_netns, "create", no_pyroute2)
        m.setattr(namespace, "_lo_up_pyroute2", no_pyroute2)
        assert netns.ensure_netns(name) == path
        assert netns.ensure_netns(name) == path  # idempotent, still no fork
    assert _thread_netns_ino() == home, "the calling thread must never change namespace"

    # /run/netns is a shared mount point; the namespace is bind-mounted on its file
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        lines = [ln.split() for ln in fh]
    run_dir = [ln for ln in lines if ln[4] == str(netns.NETNS_DIR)]
    assert run_dir and any(f.startswith("shared:") for f in run_dir[-1][6:]), run_dir
    assert str(path) in _mountinfo_under_netns()
    assert netns.netns_inode(path) != home

    # pyroute2 and iproute2 see it, lo is UP
    assert netns.interfaces_in(name) == ["lo"]
    assert _link(name, "lo").get("flags") & 1, "lo must be UP"  # type: ignore[attr-defined]
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert name in listed.stdout.split()
    lo = subprocess.run(["ip", "-n", name, "link", "show", "lo"], capture_output=True, text=True)
    assert lo.returncode == 0 and ",UP" in lo.stdout, lo.stdout + lo.stderr

    netns.remove_netns(name)
    assert not os.path.lexists(path)
    assert str(path) not in _mountinfo_under_netns()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert name not in listed.stdout.split()


def test_ensure_brings_lo_up_in_existing_netns(vm_id: str) -> None:
    name = netns.netns_name(vm_id)
    netns.ensure_netns(name)
    with IPRoute(netns=str(netns.netns_path(name)), flags=0) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="down")
    assert not _link(name, "lo").get("flags") & 1  # type: ignore[attr-defined]
    netns.ensure_netns(name)
    assert _link(name, "lo").get("flags") & 1, "lo must be UP again"  # type: ignore[attr-defined]


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS])
def test_falls_back_to_pyroute2_when_refused(
    vm_id: str, err: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = netns.netns_name(vm_id)
    path = netns.netns_path(name)
    calls: list[str] = []
    real_create = pr_netns.create

    def refused() -> None:
        raise OSError(err, os.strerror(err))

    def spy_create(p: str) -> None:
        calls.append(p)
        real_create(p)

    with monkeypatch.context() as m:
        m.setattr(namespace, "_unshare_net", refused)
        m.setattr(pr_netns, "create", spy_create)
        assert netns.ensure_netns(name) == path
    assert calls == [str(path)]
    assert netns.interfaces_in(name) == ["lo"]
    assert _link(name, "lo").get("flags") & 1, "lo must be UP"  # type: ignore[attr-defined]
    netns.remove_netns(name)
    assert str(path) not in _mountinfo_under_netns()


def test_failed_bind_mount_leaves_nothing(vm_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = netns.netns_name(vm_id)
    path = netns.netns_path(name)

    def broken(*args: object) -> str:
        return "/nonexistent/ns/net"

    with monkeypatch.context() as m:
        m.setattr(namespace, "_thread_netns_file", broken)
        with pytest.raises(NetworkError, match=r"could not create network namespace.*root"):
            netns.ensure_netns(name)
    assert not os.path.lexists(path)
    assert name not in netns.list_netns()


def test_many_namespaces_created_and_removed_cleanly() -> None:
    names = [netns.netns_name("t-" + secrets.token_hex(6)) for _ in range(20)]
    try:
        inodes = {netns.netns_inode(netns.ensure_netns(n)) for n in names}
        assert len(inodes) == len(names), "each name must get its own namespace"
    finally:
        for n in names:
            netns.remove_netns(n)
    left = set(netns.list_netns()) & set(names)
    assert not left
    assert not {str(netns.netns_path(n)) for n in names} & set(_mountinfo_under_netns())


def test_claimed_name_becomes_a_real_namespace_on_its_own_file(vm_id: str) -> None:
    """The VM path: an exclusive empty file claims the name; the namespace is bound on that
    very file (never unlinked and made again, so the name is never free meanwhile)."""
    name = netns.netns_name(vm_id)
    path = netns.claim_netns_name(name)
    assert os.path.isfile(path) and str(path) not in _mountinfo_under_netns()
    with pytest.raises(FileExistsError):
        netns.claim_netns_name(name)
    home = _thread_netns_ino()
    assert netns.create_claimed_netns(name) == path
    assert _thread_netns_ino() == home, "the calling thread must never change namespace"
    assert str(path) in _mountinfo_under_netns()
    assert netns.interfaces_in(name) == ["lo"]
    # lo stays down, as `ip netns add` leaves it: nothing in a VM's namespace uses it.
    assert not _link(name, "lo").get("flags") & 1  # type: ignore[attr-defined]
    with pytest.raises(FileExistsError):
        netns.claim_netns_name(name)  # a bound namespace is as taken as a claim
    netns.remove_netns(name)
    assert not os.path.lexists(path) and str(path) not in _mountinfo_under_netns()


def test_failed_bind_on_a_claim_keeps_the_claim_for_its_owner(
    vm_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim is recorded before the bind: a failed bind leaves it for the owner's
    rollback (remove_netns), never for someone else to take in between."""
    name = netns.netns_name(vm_id)
    path = netns.claim_netns_name(name)
    with monkeypatch.context() as m:
        m.setattr(namespace, "_thread_netns_file", lambda: "/nonexistent/ns/net")
        with pytest.raises(NetworkError, match=r"could not create network namespace.*root"):
            netns.create_claimed_netns(name)
    assert os.path.isfile(path) and str(path) not in _mountinfo_under_netns()
    netns.remove_netns(name)
    assert not os.path.lexists(path)


def test_namespace_helpers_are_reused_and_always_go_home() -> None:
    """Work count: after the first, creating namespaces starts no thread; the idle helper
    is back in the host's namespace after each job (it never serves one from elsewhere)."""
    import threading

    from ironclaw_orchestrator.vm.netns import kernel

    home = _thread_netns_ino()
    names = [netns.netns_name("t-" + secrets.token_hex(6)) for _ in range(6)]
    try:
        netns.create_claimed_netns(netns.claim_netns_name(names[0]).name)
        started, threads = kernel._WORKERS.started, threading.active_count()
        for n in names[1:]:
            netns.create_claimed_netns(netns.claim_netns_name(n).name)
            netns.ensure_netns(n)  # existing: lo up through a helper that setns()-es in
            helpers = [t for t in threading.enumerate() if t.name == "ironclaw-netns"]
            assert helpers and all(
                os.stat(f"/proc/self/task/{t.native_id}/ns/net").st_ino == home for t in helpers
            )
        assert kernel._WORKERS.started == started and threading.active_count() == threads
        inodes = {netns.netns_inode(netns.netns_path(n)) for n in names}
        assert len(inodes) == len(names) and home not in inodes
    finally:
        for n in names:
            netns.remove_netns(n)
    assert not set(netns.list_netns()) & set(names)
    assert not {str(netns.netns_path(n)) for n in names} & set(_mountinfo_under_netns())


def test_remove_stats_nothing_before_it_unmounts(
    vm_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work count at stop: one umount2 and one unlink, no stat of the namespace file."""
    from ironclaw_orchestrator.vm.netns import kernel

    name = netns.netns_name(vm_id)
    path = netns.ensure_netns(name)
    calls: list[str] = []
    real_libc_call, real_stat, real_unlink = kernel._libc_call, os.stat, os.unlink
    monkeypatch.setattr(
        kernel, "_libc_call", lambda f, *a: (calls.append(f), real_libc_call(f, *a))[1]
    )
    monkeypatch.setattr(
        os, "stat", lambda p, *a, **k: (calls.append("stat"), real_stat(p, *a, **k))[1]
    )
    monkeypatch.setattr(
        os,
        "lstat",
        lambda p, *a, **k: (calls.append("lstat"), real_stat(p, *a, follow_symlinks=False))[1],
    )
    monkeypatch.setattr(
        os, "unlink", lambda p, *a, **k: (calls.append("unlink"), real_unlink(p, *a, **k))[1]
    )
    netns.remove_netns(name)
    monkeypatch.undo()
    assert calls == ["umount2", "unlink"], calls
    assert not os.path.lexists(path) and str(path) not in _mountinfo_under_netns()
