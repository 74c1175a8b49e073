"""Cluster placement logic without Ray: power of K choices, refusals, labels, lost hosts."""

from __future__ import annotations

from typing import Any

import pytest

from ironclaw_orchestrator.cluster import Cluster, ClusterFullError, HostLostError, HostState
from ironclaw_orchestrator.cluster.client import HostAgentUnreachableError, error_from_body
from ironclaw_orchestrator.errors import ConfigError, IronclawError, RegistryError
from ironclaw_orchestrator.server.errors import DrainingError, HostFullError


class FakeAgent:
    def __init__(self, name: str, memory: int, used: int = 0, labels: dict[str, str] | None = None):
        self.name = name
        self.memory = memory
        self.used = used
        self.labels = labels or {}
        self.vms: dict[str, dict[str, Any]] = {}
        self.gone = False
        self.calls: list[str] = []

    def info(self) -> dict[str, Any]:
        return {
            "hostname": self.name,
            "health": "ok",
            "labels": self.labels,
            "capacity": {"admit_vcpus": 100, "admit_memory_mb": self.memory},
            "committed": {"vcpus": len(self.vms), "memory_mb": self.used},
        }

    def handle(self, method: str, *args: Any) -> Any:
        self.calls.append(method)
        if self.gone:
            raise HostAgentUnreachableError(f"{self.name} is gone")
        if method == "host":
            return self.info()
        if method == "create":
            body = args[0]
            if self.used + body["memory_mb"] > self.memory:
                raise HostFullError(f"host full on {self.name}")
            self.used += body["memory_mb"]
            self.vms[body["vm_id"]] = {"vm_id": body["vm_id"], "status": "running"}
            return self.vms[body["vm_id"]]
        if method == "list":
            return list(self.vms.values())
        if method == "exec":
            vm_id, request = args
            assert vm_id in self.vms
            return {"exit_code": 0, "stdout": " ".join(request["argv"]), "cwd": request.get("cwd")}
        if method == "stop":
            del self.vms[args[0]]
            return {"status": "stopped"}
        raise AssertionError(method)


class FakeCluster(Cluster):
    """``Cluster`` with the Ray actor call replaced by a direct call of a fake agent."""

    def __init__(self, agents: list[FakeAgent], **kw: Any) -> None:
        super().__init__(**kw)
        for i, agent in enumerate(agents):
            self.hosts[f"node{i}"] = HostState(node_id=f"node{i}", actor=agent)

    async def _call(self, host: HostState, method: str, *args: Any) -> Any:
        try:
            return host.actor.handle(method, *args)
        except HostAgentUnreachableError as exc:
            self._mark_unhealthy(host, f"its agent does not answer: {exc}")
            raise HostLostError(f"host {host.hostname} is gone: {host.problem}") from None


def body(vm_id: str, memory: int = 128) -> dict[str, Any]:
    return {"vm_id": vm_id, "memory_mb": memory}


async def test_least_loaded_of_k_is_tried_first() -> None:
    agents = [
        FakeAgent("busy", 1000, used=900),
        FakeAgent("idle", 1000),
        FakeAgent("mid", 1000, 500),
    ]
    cluster = FakeCluster(agents, k=3, seed=0)
    await cluster.refresh()
    handle = await cluster.start_vm(body("v1"))
    assert handle.node_id == "node1" and handle.refusals == []
    assert agents[0].calls == ["host"] and agents[2].calls == ["host"]


async def test_refusal_moves_on_to_the_next_host() -> None:
    agents = [FakeAgent("liar", 1000), FakeAgent("ok", 1000, used=100)]
    cluster = FakeCluster(agents, k=3, seed=0)
    await cluster.refresh()
    agents[0].used = 1000  # full now, but its last report said empty
    handle = await cluster.start_vm(body("v1"))
    assert handle.node_id == "node1"
    assert handle.refusals[0][0].startswith("liar") and "host full" in handle.refusals[0][1]


async def test_cluster_full_lists_every_reason() -> None:
    agents = [FakeAgent("a", 100), FakeAgent("b", 1000, used=950)]
    cluster = FakeCluster(agents, k=1, seed=0)
    with pytest.raises(ClusterFullError, match="cluster full") as info:
        await cluster.start_vm(body("v1"))
    assert "a:node0" in str(info.value) and "b:node1" in str(info.value)


async def test_power_of_k_spreads_load() -> None:
    agents = [FakeAgent(f"h{i}", 100_000) for i in range(6)]
    cluster = FakeCluster(agents, k=3, seed=42, info_ttl_s=1e9)
    for i in range(60):
        await cluster.start_vm(body(f"v{i}"))
    counts = sorted(len(a.vms) for a in agents)
    assert sum(counts) == 60 and counts[0] >= 5 and counts[-1] <= 15, counts


async def test_labels_select_hosts() -> None:
    agents = [
        FakeAgent("a", 1000, labels={"zone": "a"}),
        FakeAgent("b", 1000, labels={"zone": "b"}),
    ]
    cluster = FakeCluster(agents, seed=0)
    handle = await cluster.start_vm(body("v1"), labels={"zone": "b"})
    assert handle.node_id == "node1"
    with pytest.raises(ClusterFullError, match="no host with labels"):
        await cluster.start_vm(body("v2"), labels={"zone": "z"})


async def test_vm_faults_are_not_retried_elsewhere() -> None:
    class Bad(FakeAgent):
        def handle(self, method: str, *args: Any) -> Any:
            if method == "create":
                self.calls.append(method)
                raise ConfigError("invalid VmConfig:\n  memory_mb: too small")
            return super().handle(method, *args)

    agents = [Bad("x", 1000), Bad("y", 1000)]
    cluster = FakeCluster(agents, seed=0)
    with pytest.raises(ConfigError, match="memory_mb"):
        await cluster.start_vm(body("v1"))
    assert sum(a.calls.count("create") for a in agents) == 1


async def test_lost_host_reports_its_vms_lost_and_others_keep_working() -> None:
    agents = [FakeAgent("a", 1000), FakeAgent("b", 1000, used=500)]
    cluster = FakeCluster(agents, seed=0)
    on_a = await cluster.start_vm(body("v1"))
    assert on_a.node_id == "node0"
    agents[0].gone = True
    listed = {v["vm_id"]: v for v in await cluster.ls()}
    assert listed["v1"]["status"] == "lost" and "gone" in listed["v1"]["problem"]
    assert list(cluster.unhealthy()) == ["node0"]
    with pytest.raises(HostLostError, match="gone"):
        await on_a.stop()
    with pytest.raises(HostLostError, match="gone"):
        await on_a.exec(["true"])
    other = await cluster.start_vm(body("v2"))
    assert other.node_id == "node1"
    agents[0].gone = False
    await cluster.refresh()
    assert cluster.unhealthy() == {}


def test_errors_cross_the_wire_as_the_same_class() -> None:
    full = error_from_body(429, {"error": {"type": "HostFullError", "message": "host full: x"}})
    assert isinstance(full, HostFullError) and str(full) == "host full: x"
    assert isinstance(
        error_from_body(503, {"error": {"type": "DrainingError", "message": "d"}}), DrainingError
    )
    assert isinstance(
        error_from_body(409, {"error": {"type": "RegistryError", "message": "m"}}), RegistryError
    )
    odd = error_from_body(500, {"error": {"type": "os.system", "message": "m"}})
    assert type(odd) is IronclawError
    assert "HTTP 502" in str(error_from_body(502, "<html>bad gateway</html>"))


async def test_exec_goes_to_the_vms_host() -> None:
    agents = [FakeAgent("a", 1000), FakeAgent("b", 1000, used=500)]
    cluster = FakeCluster(agents, seed=0)
    vm = await cluster.start_vm(body("v1"))
    result = await vm.exec(["echo", "hi"], cwd="/tmp")
    assert result == {"exit_code": 0, "stdout": "echo hi", "cwd": "/tmp"}
    assert agents[0].calls.count("exec") == 1 and "exec" not in agents[1].calls
    assert (await cluster.exec("v1", ["true"]))["exit_code"] == 0


def test_guest_agent_refusals_keep_their_code_across_the_wire() -> None:
    from ironclaw_orchestrator.cluster.actor import envelope_error
    from ironclaw_orchestrator.errors import AgentRequestError

    body = {"error": {"type": "AgentRequestError", "message": "no", "reason": "bad_cwd"}}
    exc = error_from_body(422, body)
    assert isinstance(exc, AgentRequestError) and exc.code == "bad_cwd"
    again = error_from_body(0, envelope_error(exc))  # through the Ray actor's envelope
    assert isinstance(again, AgentRequestError) and again.code == "bad_cwd"
