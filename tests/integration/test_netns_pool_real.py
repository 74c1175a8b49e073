"""A VM's nameless network namespace and its reuse (``vm.netns.pool``), for real.

A namespace is kept only when nothing in it could reach the next VM; each test drains the
pool it used, so nothing outlives it (an idle namespace lives only while its probe is open).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_launch_real import probe_config

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import netns as ns
from ironclaw_orchestrator.vm import start_firecracker
from ironclaw_orchestrator.vm.netns.kernel import _MS_BIND, _mount, _run_in_new_netns, _setns
from ironclaw_orchestrator.vm.netns.namespace import _set_lo_up_here
from ironclaw_orchestrator.vm.netns.pool import POOL_ENV, NetnsPool, holds_only_lo_down
from ironclaw_orchestrator.vm.probe import ProbeBehaviour

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


@pytest.fixture
def drained_pool() -> Iterator[None]:
    ns.netns_pool.close_idle()
    yield
    ns.netns_pool.close_idle()


def inode(probe: socket.socket) -> int:
    fd = ns.open_netns(probe)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def run_inside(probe: socket.socket, func: Callable[[], None]) -> None:
    """Run ``func`` in a helper thread that has joined the probe's namespace."""
    fd = ns.open_netns(probe)
    try:
        _run_in_new_netns(lambda: _setns(fd), func)
    finally:
        os.close(fd)


def test_a_new_vm_namespace_has_no_name_and_only_lo_down() -> None:
    before = set(ns.list_netns(""))
    probe = ns.create_vm_netns()
    try:
        assert inode(probe) != os.stat("/proc/self/ns/net").st_ino
        assert holds_only_lo_down(probe)
        assert set(ns.list_netns("")) == before, "nothing appears under /run/netns"
        fd = ns.open_netns(probe)
        assert os.get_inheritable(fd) is False, "never inherited by what we spawn"
        os.close(fd)
    finally:
        probe.close()


def test_a_kept_namespace_is_handed_out_again() -> None:
    pool = NetnsPool(size=2)
    probe = ns.create_vm_netns()
    ino = inode(probe)
    assert pool.keep(probe) and len(pool) == 1
    again = pool.take()
    assert again is probe and len(pool) == 0 and pool.reused == 1
    assert inode(again) == ino and holds_only_lo_down(again)
    again.close()
    assert pool.take() is None, "an empty pool hands out nothing"


def test_a_namespace_someone_changed_is_not_kept() -> None:
    pool = NetnsPool(size=4)
    probe = ns.create_vm_netns()
    run_inside(probe, _set_lo_up_here)
    assert not pool.keep(probe) and probe.fileno() == -1, "refused and its probe closed"

    probe = ns.create_vm_netns()  # a tap made in it (by name, bound for the test)
    name = f"ironclaw-pooltest-{secrets.token_hex(4)}"
    path = ns.claim_netns_name(name)
    try:
        fd = ns.open_netns(probe)
        try:
            _mount(f"/proc/self/fd/{fd}", str(path), _MS_BIND)
        finally:
            os.close(fd)
        ns.ensure_tap(name, "icltest0", 64000, 64000)
    finally:
        ns.remove_netns(name)
    assert not pool.keep(probe) and len(pool) == 0


def test_the_pool_keeps_no_more_than_its_size() -> None:
    pool = NetnsPool(size=1)
    probes = [ns.create_vm_netns() for _ in range(2)]
    assert [pool.keep(p) for p in probes] == [True, False]
    assert probes[1].fileno() == -1
    pool.close_idle()
    assert len(pool) == 0 and probes[0].fileno() == -1


def test_a_forked_child_starts_with_an_empty_pool(drained_pool: None) -> None:
    assert ns.netns_pool.keep(ns.create_vm_netns())
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if len(ns.netns_pool) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(ns.netns_pool) == 1, "the parent keeps its own"


async def test_a_vm_runs_in_a_nameless_namespace_the_next_vm_reuses(
    real_host: None, drained_pool: None
) -> None:
    ids = [f"it-{secrets.token_hex(5)}" for _ in range(2)]
    inodes = []
    for vm_id in ids:
        vm = await start_firecracker(probe_config(vm_id, ProbeBehaviour.HALT))
        try:
            res = vm.vmm.resources
            assert res.netns_name is None and res.netns_fd is None, "ready: our fd is closed"
            assert res.netns_probe is not None
            vmm_ns = os.stat(f"/proc/{vm.pid}/ns/net").st_ino
            assert vmm_ns == inode(res.netns_probe), "the jailer joined the one we made"
            assert vmm_ns != os.stat("/proc/self/ns/net").st_ino
            assert vm.vmm.netns_path == f"/proc/{vm.pid}/ns/net"
            assert not os.path.lexists(ns.netns_path(ns.netns_name(vm_id))), "no name"
            inodes.append(vmm_ns)
        finally:
            await vm.stop()
    assert inodes[0] == inodes[1] and ns.netns_pool.reused >= 1
    assert len(ns.netns_pool) == 1


async def test_with_reuse_off_a_vm_lets_its_namespace_go(
    real_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ns, "netns_pool", NetnsPool(size=0))
    vm = await start_firecracker(probe_config(f"it-{secrets.token_hex(5)}", ProbeBehaviour.HALT))
    probe = vm.vmm.resources.netns_probe
    assert probe is not None
    await vm.stop()
    assert probe.fileno() == -1 and len(ns.netns_pool) == 0, "its probe closed: freed"


async def test_a_vm_with_a_tap_never_returns_its_namespace(
    real_host: None, drained_pool: None
) -> None:
    vm_id = f"it-{secrets.token_hex(5)}"
    vm = await start_firecracker(probe_config(vm_id, ProbeBehaviour.HALT, enable_networking=True))
    try:
        assert vm.vmm.netns_path == str(ns.netns_path(ns.netns_name(vm_id))), "named"
        assert vm.vmm.resources.netns_probe is None
    finally:
        await vm.stop()
    assert len(ns.netns_pool) == 0
    assert not os.path.lexists(ns.netns_path(ns.netns_name(vm_id)))


async def test_a_bad_pool_size_is_refused_before_anything_is_recorded(
    real_host: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(POOL_ENV, "lots")
    monkeypatch.setattr(ns, "netns_pool", NetnsPool())  # reads the variable afresh
    registry = Registry(state_dir=tmp_path / "state")

    def claim(*args: object, **kw: object) -> None:
        raise AssertionError("the record was claimed before the setting was checked")

    monkeypatch.setattr(registry, "claim", claim)
    vm_id = f"it-{secrets.token_hex(5)}"
    with pytest.raises(ConfigError, match="IRONCLAW_NETNS_POOL='lots' is not a whole number"):
        await start_firecracker(probe_config(vm_id, ProbeBehaviour.HALT), registry=registry)
