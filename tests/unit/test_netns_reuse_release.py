"""When a stopping VM's nameless namespace goes back to the reuse pool (``JailResources``).

Kept when its VMM was reaped by stop, nothing failed before and its cgroups are gone;
otherwise its probe is closed (the kernel frees the namespace). Our descriptor of it is
closed either way. A named namespace (a VM with a tap or uplink) is never kept.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from ironclaw_orchestrator.vm import netns as ns
from ironclaw_orchestrator.vm import resources
from ironclaw_orchestrator.vm.resources import JailResources


class Probe:
    closed = False

    def close(self) -> None:
        self.closed = True


class Pool:
    def __init__(self) -> None:
        self.kept: list[Any] = []

    def keep(self, probe: Any) -> bool:
        self.kept.append(probe)
        return True


class FailingCgroups:
    def remove_lock_free(self) -> bool:
        return False

    def remove(self) -> None:
        raise OSError(16, "Device or resource busy")

    @property
    def paths(self) -> dict[str, str]:
        return {"memory": "/sys/fs/cgroup/memory/x"}


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    pool, calls = Pool(), []

    def remove_network(name: str, vm_id: str, tap: object, uplink: bool) -> None:
        calls.append(name)

    monkeypatch.setattr(ns, "netns_pool", pool)
    monkeypatch.setattr(resources.cleanup, "remove_network", remove_network)
    return {"pool": pool, "calls": calls}


def res(**kw: Any) -> tuple[JailResources, Probe, int]:
    probe, fd = Probe(), os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    r = JailResources(vm_id="a", netns_probe=probe, netns_fd=fd, **kw)  # type: ignore[arg-type]
    return r, probe, fd


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("inline", [True, False])
def test_a_reaped_vms_namespace_is_kept(world: dict[str, Any], inline: bool) -> None:
    r, probe, fd = res(vmm_reaped=True)
    assert r.release_inline() if inline else r.release() is None
    assert world["pool"].kept == [probe] and not probe.closed
    assert r.netns_probe is None and r.netns_fd is None and not fd_open(fd)
    assert world["calls"] == [], "a nameless namespace has nothing to remove"


def test_the_descriptor_closes_once_ready_and_the_probe_stays() -> None:
    r, probe, fd = res()
    r.close_netns_fd()
    assert r.netns_fd is None and not fd_open(fd)
    assert r.netns_probe is probe and not probe.closed
    r.close_netns_fd()  # idempotent


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize(
    "kw",
    [{}, {"vmm_reaped": True, "vmm_unknown": True}],
    ids=["not reaped (a failed start)", "a VMM lost track of"],
)
def test_a_vm_stop_did_not_reap_never_returns_its_namespace(
    world: dict[str, Any], inline: bool, kw: dict[str, Any]
) -> None:
    r, probe, fd = res(**kw)
    if inline:
        r.release_inline()
    r.release()
    assert world["pool"].kept == [] and probe.closed and not fd_open(fd)


def test_a_named_namespace_goes_by_name_and_in_a_thread(world: dict[str, Any]) -> None:
    r = JailResources(vm_id="a", netns_name="ironclaw-a", tap="tap-a", vmm_reaped=True)
    assert not r.release_inline(), "a tap goes by netlink: not on the event loop"
    r.release()
    assert world["calls"] == ["ironclaw-a"] and world["pool"].kept == []


def test_a_namespace_is_not_kept_when_the_cgroups_could_not_go(world: dict[str, Any]) -> None:
    r, probe, fd = res(vmm_reaped=True, cgroups=FailingCgroups())
    assert not r.release_inline()
    with pytest.raises(Exception, match="cgroups"):
        r.release()
    assert probe.closed and world["pool"].kept == [] and not fd_open(fd)
