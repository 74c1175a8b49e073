"""Placement across a local 3-node Ray cluster, each node with its own host agent (own
socket, state dir, run dir and chroot base), against the real jailer + firecracker."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_harness import AgentHarness, probe_body, vm_leftovers
from conftest import _missing

from ironclaw_orchestrator.agent.guest import build_vsock_guest
from ironclaw_orchestrator.cluster import (
    HOST_RESOURCE,
    Cluster,
    ClusterFullError,
    HostLostError,
    VmHandle,
)
from ironclaw_orchestrator.cluster.client import AGENT_SOCKET_ENV
from ironclaw_orchestrator.errors import AgentRequestError, HostError
from ironclaw_orchestrator.vm.process import become_subreaper

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]  # a Ray cluster starts

VMS = 30
ZONES = ("a", "b", "c")


_RAY: dict[str, Any] = {}


def _vsock_guest() -> Path | None:
    try:
        return build_vsock_guest()
    except (HostError, OSError):
        return None


#: The C vsock test guest (speaks the guest agent's handshake), if it can be built here.
VSOCK_GUEST = _vsock_guest()


@dataclass
class Node:
    zone: str
    agent: AgentHarness
    node_id: str = ""


@pytest.fixture(scope="module")
def nodes() -> Iterator[dict[str, Node]]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    become_subreaper()
    images = ["--image-dir", str(VSOCK_GUEST.parent)] if VSOCK_GUEST else []
    # Zone c is small: two 128 MiB VMs fill it.
    agents = {
        "a": AgentHarness("a", extra=["--label", "zone=a", "--cpu-overcommit", "16", *images]),
        "b": AgentHarness("b", extra=["--label", "zone=b", "--cpu-overcommit", "16", *images]),
        "c": AgentHarness("c", extra=["--label", "zone=c", "--capacity-memory", "300", *images]),
    }
    out = {z: Node(z, a) for z, a in agents.items()}
    rc: Any = None
    # Ray's session files go under agent a's private dir, removed with it.
    old_tmp = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(agents["a"].root)
    try:
        for a in agents.values():
            a.start()
        # Head plus two workers, one CPU each, each told where its agent is.
        args = [
            dict(
                num_cpus=1,
                resources={HOST_RESOURCE: 1},
                labels={"zone": z},
                env_vars={AGENT_SOCKET_ENV: str(agents[z].socket)},
                object_store_memory=80 * 2**20,
            )
            for z in ZONES
        ]
        head = {**args[0], "include_dashboard": False}
        rc = cluster_utils.Cluster(initialize_head=True, head_node_args=head)
        for extra in args[1:]:
            rc.add_node(**extra)
        rc.wait_for_nodes()
        _RAY["cluster"] = rc
        ray.init(address=rc.address, namespace="ironclaw", log_to_driver=False)
        for n in ray.nodes():
            zone = (n.get("Labels") or {}).get("zone")
            if zone in out and n["Alive"]:
                out[zone].node_id = n["NodeID"]
        yield out
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if rc is not None:
            rc.shutdown()
        if old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmp
        left = [x for a in agents.values() for x in a.teardown()]
        assert not left, f"cluster test left resources behind: {left}"


@pytest.fixture
def ray_cluster(nodes: dict[str, Node]) -> Any:
    return _RAY["cluster"]


@pytest.fixture
async def cluster(nodes: dict[str, Node]) -> AsyncIterator[Cluster]:
    c = await Cluster.connect(call_timeout_s=60, seed=1)
    yield c


def zone_of(nodes: dict[str, Node], node_id: str) -> str:
    return next(z for z, n in nodes.items() if n.node_id == node_id)


async def test_thirty_vms_placed_by_capacity_and_stopped(
    nodes: dict[str, Node], cluster: Cluster
) -> None:
    assert sorted(h.labels["zone"] for h in cluster.hosts.values()) == list(ZONES)
    run = uuid.uuid4().hex[:6]
    gate = asyncio.Semaphore(6)

    async def place(i: int) -> VmHandle:
        async with gate:
            return await cluster.start_vm(probe_body(f"cl-{run}-{i}"))

    handles = await asyncio.gather(*(place(i) for i in range(VMS)))
    per_zone = {z: 0 for z in ZONES}
    for h in handles:
        assert h.info["status"] == "running" and h.info["sandboxed"] is True
        per_zone[zone_of(nodes, h.node_id)] += 1
    assert sum(per_zone.values()) == VMS
    assert per_zone["c"] <= 2, per_zone  # 300 MiB holds two 128 MiB VMs, never more
    assert per_zone["a"] > 0 and per_zone["b"] > 0, per_zone
    listed = await cluster.ls()
    ours = [v for v in listed if v["vm_id"].startswith(f"cl-{run}-")]
    assert len(ours) == VMS and all(v["status"] == "running" for v in ours)
    for v in ours:
        assert zone_of(nodes, v["node_id"]) == zone_of(
            nodes, next(h.node_id for h in handles if h.vm_id == v["vm_id"])
        )
    await asyncio.gather(*(h.stop() for h in handles))
    assert not [v for v in await cluster.ls() if v["vm_id"].startswith(f"cl-{run}-")]
    for h in handles:
        assert not vm_leftovers(h.vm_id, nodes[zone_of(nodes, h.node_id)].agent)


async def test_full_node_refuses_and_the_vm_lands_elsewhere(
    nodes: dict[str, Node], cluster: Cluster
) -> None:
    run = uuid.uuid4().hex[:6]
    small = nodes["c"]
    filled: list[str] = []
    with small.agent.client() as c:  # fill zone c behind the cluster's back
        for i in range(3):
            r = c.post("/v1/vms", params={"start": "true"}, json=probe_body(f"fill-{run}-{i}"))
            if r.status_code == 429:
                assert r.json()["error"]["reason"] == "host_full"
                break
            assert r.status_code == 201, r.text
            filled.append(r.json()["vm_id"])
    assert len(filled) == 2
    try:
        # The cluster still believes zone c is empty (a stale report): it tries c first.
        await cluster.refresh()
        host_c = cluster.hosts[small.node_id]
        assert host_c.info is not None
        for h in cluster.hosts.values():
            assert h.info is not None
            # ... and the others busier than it, so the least loaded of the K is c.
            half = h.info["capacity"]["admit_memory_mb"] // 2
            h.info["committed"] = {"vcpus": 0, "memory_mb": 0 if h is host_c else half}
            h.info_at = time.monotonic() + 3600
        handle = await cluster.start_vm(probe_body(f"else-{run}"))
        assert handle.node_id != small.node_id
        assert [name for name, _ in handle.refusals] == [host_c.hostname]
        assert "host_full" in handle.refusals[0][1]
        await handle.stop()

        with pytest.raises(ClusterFullError, match="cluster full") as info:
            await cluster.start_vm(probe_body(f"full-{run}"), labels={"zone": "c"})
        assert "host_full" in str(info.value) or "host full" in str(info.value)
        with pytest.raises(ClusterFullError, match="no host with labels"):
            await cluster.start_vm(probe_body(f"none-{run}"), labels={"zone": "mars"})
    finally:
        with small.agent.client() as c:
            for vm_id in filled:
                assert c.delete(f"/v1/vms/{vm_id}").status_code == 200


async def test_killed_agent_marks_its_host_unhealthy_and_its_vms_lost(
    nodes: dict[str, Node], cluster: Cluster
) -> None:
    run = uuid.uuid4().hex[:6]
    b = nodes["b"]
    on_b = await cluster.start_vm(probe_body(f"lost-{run}"), labels={"zone": "b"})
    assert on_b.node_id == b.node_id
    b.agent.signal(signal.SIGKILL)
    try:
        listed = {v["vm_id"]: v for v in await cluster.ls()}
        assert listed[on_b.vm_id]["status"] == "lost"
        assert b.node_id in cluster.unhealthy()
        with pytest.raises(HostLostError, match="is gone"):
            await on_b.stop()
        # The other hosts keep working, and placement avoids the lost one.
        other = await cluster.start_vm(probe_body(f"alive-{run}"))
        assert other.node_id != b.node_id
        await other.stop()
    finally:
        b.agent.start()  # the VM survived with its supervisor; the new agent adopts it
    await cluster.refresh()
    assert b.node_id not in cluster.unhealthy()
    assert cluster.hosts[b.node_id].info["adopted"] == [on_b.vm_id]  # type: ignore[index]
    await cluster.stop(on_b.vm_id)
    assert not vm_leftovers(on_b.vm_id, b.agent)


async def test_exec_through_the_cluster_reaches_the_guest_agent(
    nodes: dict[str, Node], cluster: Cluster
) -> None:
    if VSOCK_GUEST is None:
        pytest.skip("cannot build the C vsock test guest (gcc missing?)")
    body = probe_body(f"ex-{uuid.uuid4().hex[:6]}", kernel_path=str(VSOCK_GUEST))
    vm = await cluster.start_vm({**body, "vsock_guest_cid": 3})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                await vm.exec(["true"])
            except AgentRequestError as exc:  # the C guest speaks only hello, ping, echo
                assert exc.code == "unknown_request"
                break
            except Exception:
                # the guest's agent is not listening yet (AgentConnectionError)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the C test guest ran a command?")
    finally:
        await vm.stop()
    assert not vm_leftovers(vm.vm_id, nodes[zone_of(nodes, vm.node_id)].agent)


async def test_removed_node_marks_its_host_lost_without_waiting(
    nodes: dict[str, Node], cluster: Cluster, ray_cluster: Any
) -> None:
    """Runs last: it takes zone c's node out of the Ray cluster (its agent keeps running)."""
    run = uuid.uuid4().hex[:6]
    c = nodes["c"]
    on_c = await cluster.start_vm(probe_body(f"gone-{run}"), labels={"zone": "c"})
    worker = next(n for n in ray_cluster.worker_nodes if n.node_id == c.node_id)
    ray_cluster.remove_node(worker)
    try:
        deadline = time.monotonic() + 60
        while c.node_id not in cluster.unhealthy():
            assert time.monotonic() < deadline, "Ray never reported the node gone"
            await asyncio.sleep(0.5)
            await cluster.discover()
        assert "Ray node is gone" in cluster.unhealthy()[c.node_id]
        t0 = time.monotonic()
        listed = {v["vm_id"]: v for v in await cluster.ls()}
        assert listed[on_c.vm_id]["status"] == "lost"
        with pytest.raises(HostLostError):
            await on_c.stop()
        assert time.monotonic() - t0 < 30  # reported, not hung on
    finally:
        with c.agent.client() as client:  # the VM itself is fine: stop it on its host
            assert client.delete(f"/v1/vms/{on_c.vm_id}").status_code == 200
    assert not vm_leftovers(on_c.vm_id, c.agent)
