"""When a stopping VM's namespace goes back to the reuse pool (``JailResources``), with fakes.

Kept only after its name is gone, when its VMM was reaped by stop, nothing failed before and
its cgroups are gone; otherwise its probe is closed (the kernel frees the namespace).
"""

from __future__ import annotations

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
        if name.endswith("-stuck"):
            raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(ns, "netns_pool", pool)
    monkeypatch.setattr(resources.cleanup, "remove_network", remove_network)
    return {"pool": pool, "calls": calls}


def res(name: str = "ironclaw-a", **kw: Any) -> tuple[JailResources, Probe]:
    probe = Probe()
    r = JailResources(vm_id="a", netns_name=name, netns_probe=probe, **kw)  # type: ignore[arg-type]
    return r, probe


@pytest.mark.parametrize("inline", [True, False])
def test_a_reaped_vms_namespace_is_kept_after_its_name_is_gone(
    world: dict[str, Any], inline: bool
) -> None:
    r, probe = res(vmm_reaped=True)
    assert r.release_inline() if inline else r.release() is None
    assert world["calls"] == ["ironclaw-a"] and world["pool"].kept == [probe]
    assert r.netns_probe is None and not probe.closed


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize(
    "kw",
    [{}, {"vmm_reaped": True, "vmm_unknown": True}],
    ids=["not reaped (a failed start)", "a VMM lost track of"],
)
def test_a_vm_stop_did_not_reap_never_returns_its_namespace(
    world: dict[str, Any], inline: bool, kw: dict[str, Any]
) -> None:
    r, probe = res(**kw)
    if inline:
        r.release_inline()
    r.release()
    assert world["pool"].kept == [] and probe.closed


def test_a_namespace_whose_name_stays_is_not_kept(world: dict[str, Any]) -> None:
    r, probe = res("ironclaw-stuck", vmm_reaped=True)
    assert not r.release_inline()
    assert probe.closed and world["pool"].kept == []
    with pytest.raises(Exception, match="network namespace ironclaw-stuck"):
        r.release()
    assert world["pool"].kept == []


def test_a_namespace_is_not_kept_when_the_cgroups_could_not_go(world: dict[str, Any]) -> None:
    r, probe = res(vmm_reaped=True, cgroups=FailingCgroups())  # type: ignore[arg-type]
    assert not r.release_inline()
    with pytest.raises(Exception, match="cgroups"):
        r.release()
    assert world["calls"] == ["ironclaw-a"], "the namespace is still removed"
    assert probe.closed and world["pool"].kept == []
