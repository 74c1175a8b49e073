"""Reusing a finished VM's network namespace (``vm.netns.pool``), with real namespaces and VMs.

A namespace is kept only when nothing in it could reach the next VM; each test drains the
pool it used, so nothing outlives it (an idle namespace lives only while its probe is open).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_launch_real import probe_config

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import netns as ns
from ironclaw_orchestrator.vm import start_firecracker
from ironclaw_orchestrator.vm.netns.kernel import _run_in_netns
from ironclaw_orchestrator.vm.netns.namespace import _set_lo_up_here
from ironclaw_orchestrator.vm.netns.pool import POOL_ENV, NetnsPool
from ironclaw_orchestrator.vm.probe import ProbeBehaviour

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


@pytest.fixture
def names() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for name in made:
        ns.remove_netns(name)


@pytest.fixture
def drained_pool() -> Iterator[None]:
    ns.netns_pool.close_idle()
    yield
    ns.netns_pool.close_idle()


def _claimed(names: list[str]) -> str:
    name = f"ironclaw-pooltest-{secrets.token_hex(4)}"
    ns.claim_netns_name(name)
    names.append(name)
    return name


def test_a_kept_namespace_is_bound_again_for_the_next_name(names: list[str]) -> None:
    pool = NetnsPool(size=2)
    first = _claimed(names)
    _, probe = ns.create_claimed_netns_probed(first)
    ino = ns.netns_inode(ns.netns_path(first))
    assert pool.keep(probe) and len(pool) == 1
    ns.remove_netns(first)
    second = _claimed(names)
    again = pool.bind_idle(ns.netns_path(second))
    assert again is not None and len(pool) == 0 and pool.reused == 1
    assert ns.netns_inode(ns.netns_path(second)) == ino, "the same namespace, under the new name"
    assert ns.interfaces_in(second) == ["lo"]
    again.close()
    assert pool.bind_idle(ns.netns_path(_claimed(names))) is None, "an empty pool binds nothing"


def test_a_namespace_someone_changed_is_not_kept(names: list[str]) -> None:
    pool = NetnsPool(size=4)
    lo_up = _claimed(names)
    _, probe = ns.create_claimed_netns_probed(lo_up)
    _run_in_netns(lo_up, _set_lo_up_here)
    assert not pool.keep(probe) and probe.fileno() == -1, "refused and its probe closed"

    with_tap = _claimed(names)
    _, probe = ns.create_claimed_netns_probed(with_tap)
    ns.ensure_tap(with_tap, "icltest0", 64000, 64000)
    assert not pool.keep(probe) and len(pool) == 0


def test_the_pool_keeps_no_more_than_its_size(names: list[str]) -> None:
    pool = NetnsPool(size=1)
    probes = [ns.create_claimed_netns_probed(_claimed(names))[1] for _ in range(2)]
    assert [pool.keep(p) for p in probes] == [True, False]
    assert probes[1].fileno() == -1
    pool.close_idle()
    assert len(pool) == 0 and probes[0].fileno() == -1


def test_a_forked_child_starts_with_an_empty_pool(names: list[str], drained_pool: None) -> None:
    _, probe = ns.create_claimed_netns_probed(_claimed(names))
    assert ns.netns_pool.keep(probe)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if len(ns.netns_pool) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(ns.netns_pool) == 1, "the parent keeps its own"


async def test_the_next_vm_gets_the_finished_vms_namespace(
    real_host: None, drained_pool: None
) -> None:
    ids = [f"it-{secrets.token_hex(5)}" for _ in range(2)]
    inodes = []
    for vm_id in ids:
        vm = await start_firecracker(probe_config(vm_id, ProbeBehaviour.HALT))
        try:
            inodes.append(os.stat(f"/proc/{vm.pid}/ns/net").st_ino)
            assert inodes[-1] != os.stat("/proc/self/ns/net").st_ino
        finally:
            await vm.stop()
        assert not os.path.lexists(ns.netns_path(ns.netns_name(vm_id))), "its name is gone"
    assert inodes[0] == inodes[1] and ns.netns_pool.reused >= 1
    assert len(ns.netns_pool) == 1


async def test_a_vm_with_a_tap_never_returns_its_namespace(
    real_host: None, drained_pool: None
) -> None:
    vm_id = f"it-{secrets.token_hex(5)}"
    vm = await start_firecracker(probe_config(vm_id, ProbeBehaviour.HALT, enable_networking=True))
    await vm.stop()
    assert len(ns.netns_pool) == 0


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
    assert not os.path.lexists(ns.netns_path(ns.netns_name(vm_id)))
