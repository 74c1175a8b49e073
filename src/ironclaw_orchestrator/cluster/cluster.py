"""Placement across hosts on Ray: one :class:`~.actor.HostActor` per host node, and
:class:`Cluster`, the client that places VMs with the power of K choices.

A host node is a Ray node with the custom resource ``ironclaw_host`` (``ray start
--resources '{"ironclaw_host": 1}'``) and a host agent whose socket is in the node's
``IRONCLAW_AGENT_SOCKET`` (default ``/run/ironclaw/agent.sock``). Placement samples K hosts
(K=3) among the healthy ones whose labels match, tries the least loaded (committed over
admissible vCPUs and memory, as each agent reports), and on a refusal from a full host
tries the next; when every candidate refused, :class:`ClusterFullError` lists why.

The agents decide admission; this client only ranks. A host whose node or agent is gone
is marked unhealthy, and the VMs last seen there are reported ``lost`` instead of waited on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import IronclawError
from ..server.errors import AdmissionError, NotFoundError
from ..vm import VmConfig
from .actor import HostActor
from .client import HostAgentUnreachableError, error_from_body

__all__ = [
    "HOST_RESOURCE",
    "Cluster",
    "ClusterFullError",
    "HostLostError",
    "HostState",
    "VmHandle",
]

log = logging.getLogger(__name__)

HOST_RESOURCE = "ironclaw_host"
NAMESPACE = "ironclaw"
DEFAULT_K = 3
#: How long an actor call may take before its host counts as gone (a VM start is ~1 s).
DEFAULT_CALL_TIMEOUT_S = 60.0
#: Host info older than this is refreshed before a placement.
DEFAULT_INFO_TTL_S = 1.0


class ClusterFullError(IronclawError):
    """No host admitted the VM: every candidate refused, or none matched."""


class HostLostError(IronclawError):
    """The VM's host (its Ray node or its agent) is gone; the VM is reported lost."""


@dataclass
class HostState:
    """What the cluster client knows about one host."""

    node_id: str
    actor: Any
    ray_labels: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] | None = None
    info_at: float = 0.0
    healthy: bool = True
    problem: str | None = None
    #: Its Ray node left the cluster: its actor cannot run anywhere, so it is not called.
    node_gone: bool = False
    #: VM ids last seen on (or placed on) this host.
    known_vms: set[str] = field(default_factory=set)

    @property
    def labels(self) -> dict[str, str]:
        agent_labels = dict((self.info or {}).get("labels") or {})
        return {**self.ray_labels, **agent_labels}

    @property
    def hostname(self) -> str:
        """``<agent hostname>:<node id prefix>`` (several nodes may share a machine)."""
        return f"{(self.info or {}).get('hostname') or '?'}:{self.node_id[:8]}"

    def load(self) -> float:
        """Committed over admissible, the larger of vCPUs and memory (1.0 = full)."""
        if self.info is None:
            return 1.0
        cap, used = self.info["capacity"], self.info["committed"]
        return max(
            float(used["vcpus"]) / max(1, int(cap["admit_vcpus"])),
            float(used["memory_mb"]) / max(1, int(cap["admit_memory_mb"])),
        )

    def may_fit(self, vcpus: int, memory_mb: int) -> bool:
        """Whether the last report leaves room (the agent still has the final say)."""
        if self.info is None:
            return True
        cap, used = self.info["capacity"], self.info["committed"]
        return bool(
            used["vcpus"] + vcpus <= cap["admit_vcpus"]
            and used["memory_mb"] + memory_mb <= cap["admit_memory_mb"]
        )

    def charge(self, vcpus: int, memory_mb: int) -> None:
        if self.info is not None:
            used = self.info["committed"]
            used["vcpus"] += vcpus
            used["memory_mb"] += memory_mb


@dataclass
class VmHandle:
    """A VM placed by the cluster, bound to its host."""

    vm_id: str
    node_id: str
    hostname: str
    info: dict[str, Any]
    #: ``(host, reason)`` of every host that refused before this one admitted it.
    refusals: list[tuple[str, str]]
    cluster: Cluster = field(repr=False)

    async def stop(self) -> None:
        await self.cluster.stop(self)

    async def refresh(self) -> dict[str, Any]:
        self.info = await self.cluster.get(self)
        return self.info

    async def exec(self, argv: list[str], **options: Any) -> dict[str, Any]:
        """Run ``argv`` in the VM through its guest agent; see :meth:`Cluster.exec`."""
        return await self.cluster.exec(self, argv, **options)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise IronclawError(
            "ironclaw_orchestrator.cluster needs Ray: pip install 'ironclaw-orchestrator[ray]'"
        ) from None
    return ray


class Cluster:
    """Places VMs on the host agents of a Ray cluster. Create with :meth:`connect`."""

    def __init__(
        self,
        *,
        k: int = DEFAULT_K,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        info_ttl_s: float = DEFAULT_INFO_TTL_S,
        seed: int | None = None,
    ) -> None:
        self.k = k
        self.call_timeout_s = call_timeout_s
        self.info_ttl_s = info_ttl_s
        self.hosts: dict[str, HostState] = {}
        self._rng = random.Random(seed)

    @classmethod
    async def connect(
        cls,
        address: str | None = "auto",
        *,
        k: int = DEFAULT_K,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        info_ttl_s: float = DEFAULT_INFO_TTL_S,
        seed: int | None = None,
    ) -> Cluster:
        """Join the Ray cluster at ``address`` and find its host nodes and their agents."""
        ray = _ray()
        if not ray.is_initialized():
            await asyncio.to_thread(
                ray.init, address=address, namespace=NAMESPACE, log_to_driver=False
            )
        cluster = cls(k=k, call_timeout_s=call_timeout_s, info_ttl_s=info_ttl_s, seed=seed)
        await cluster.discover()
        return cluster

    async def discover(self) -> list[HostState]:
        """(Re)read Ray's node table: add new host nodes, mark dead ones unhealthy."""
        ray = _ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = await asyncio.to_thread(ray.nodes)
        remote_actor = ray.remote(HostActor)
        alive: set[str] = set()
        for node in nodes:
            node_id = str(node["NodeID"])
            if not node.get("Alive") or HOST_RESOURCE not in (node.get("Resources") or {}):
                continue
            alive.add(node_id)
            if node_id in self.hosts:
                continue
            actor = remote_actor.options(
                name=f"ironclaw-host-{node_id}",
                namespace=NAMESPACE,
                get_if_exists=True,
                # One per node, shared by every Cluster client; not tied to this driver.
                lifetime="detached",
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                max_restarts=-1,
            ).remote(node_id)
            labels = {str(k): str(v) for k, v in (node.get("Labels") or {}).items()}
            self.hosts[node_id] = HostState(node_id=node_id, actor=actor, ray_labels=labels)
        for node_id, host in self.hosts.items():
            if node_id not in alive:
                host.node_gone = True
                self._mark_unhealthy(host, "its Ray node is gone")
        if not self.hosts:
            raise ClusterFullError(
                f"no host nodes in this Ray cluster: start nodes with --resources "
                f"'{{\"{HOST_RESOURCE}\": 1}}' and run `ironclaw serve` on each"
            )
        await self.refresh()
        return list(self.hosts.values())

    # ------------------------------------------------------------------ calls

    def _mark_unhealthy(self, host: HostState, why: str) -> None:
        if host.healthy:
            log.warning("host %s is unhealthy: %s", host.hostname, why)
        host.healthy = False
        host.problem = why

    async def _call(self, host: HostState, method: str, *args: Any) -> Any:
        """Call the host's actor; unwrap its envelope; a gone host raises HostLostError."""
        ray = _ray()
        if host.node_gone:
            raise HostLostError(f"host {host.hostname} is gone: {host.problem}")
        try:
            ref = getattr(host.actor, method).remote(*args)
            reply = await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.call_timeout_s)
        except (TimeoutError, ray.exceptions.RayError) as exc:
            self._mark_unhealthy(host, f"its actor did not answer: {type(exc).__name__}")
            raise HostLostError(f"host {host.hostname} is gone: {host.problem}") from None
        if reply.get("ok"):
            return reply["value"]
        err = reply.get("error") or {}
        error = error_from_body(0, {"error": err})
        if err.get("type") == HostAgentUnreachableError.__name__:
            self._mark_unhealthy(host, f"its agent does not answer: {err.get('message')}")
            raise HostLostError(f"host {host.hostname} is gone: {host.problem}")
        raise error

    async def refresh(self, *, force: bool = True) -> None:
        """Ask every host for its capacity and health (in parallel)."""
        now = time.monotonic()
        todo = [h for h in self.hosts.values() if force or now - h.info_at > self.info_ttl_s]

        async def one(host: HostState) -> None:
            try:
                host.info = await self._call(host, "host")
            except HostLostError:
                return
            except IronclawError as exc:
                self._mark_unhealthy(host, str(exc))
                return
            host.info_at = time.monotonic()
            host.healthy = host.info.get("health") == "ok"
            host.problem = None if host.healthy else str(host.info.get("health"))

        await asyncio.gather(*(one(h) for h in todo))

    # ------------------------------------------------------------------ placement

    async def start_vm(
        self, config: VmConfig | Mapping[str, Any], *, labels: Mapping[str, str] | None = None
    ) -> VmHandle:
        """Place and start one VM; returns its handle once it runs on some host.

        ``labels``: only hosts whose labels (agent ``--label`` and Ray node labels) include
        all of these. Raises :class:`ClusterFullError` when no host admits the VM, or the
        host's error (``ConfigError``, ``PolicyError``, ``VmError`` ...) when the VM itself
        is at fault.
        """
        if isinstance(config, VmConfig):
            body = config.model_dump(mode="json", exclude_unset=True)
        else:
            body = dict(config)
        body.setdefault("vm_id", f"vm-{uuid.uuid4().hex[:12]}")
        vm_id = str(body["vm_id"])
        vcpus = int(body.get("vcpu_count", 1))
        memory = int(body.get("memory_mb", 512))
        await self.refresh(force=False)
        wanted = dict(labels or {})
        matching = [
            h for h in self.hosts.values() if all(h.labels.get(k) == v for k, v in wanted.items())
        ]
        refusals: list[tuple[str, str]] = []
        for h in matching:
            if not h.healthy:
                refusals.append((h.hostname, f"unhealthy: {h.problem}"))
        remaining = [h for h in matching if h.healthy]
        while remaining:
            sample = self._rng.sample(remaining, min(self.k, len(remaining)))
            fitting = [h for h in sample if h.may_fit(vcpus, memory)]
            if not fitting:
                for h in sample:
                    refusals.append((h.hostname, "host full (last report)"))
                    remaining.remove(h)
                continue
            host = min(fitting, key=lambda h: h.load())
            try:
                info = await self._call(host, "create", body, True)
            except AdmissionError as exc:
                refusals.append((host.hostname, f"{exc.reason}: {exc}"))
                remaining.remove(host)
                host.info_at = 0.0  # its report was stale: re-read before trusting it again
                continue
            except HostLostError as exc:
                refusals.append((host.hostname, str(exc)))
                remaining.remove(host)
                continue
            host.charge(vcpus, memory)
            host.known_vms.add(vm_id)
            return VmHandle(vm_id, host.node_id, host.hostname, info, refusals, self)
        where = f" with labels {wanted}" if wanted else ""
        if not matching:
            raise ClusterFullError(
                f"cluster full: no host{where} (hosts: "
                f"{', '.join(f'{h.hostname} {h.labels}' for h in self.hosts.values())})"
            )
        reasons = "\n".join(f"  {name}: {why}" for name, why in refusals)
        raise ClusterFullError(
            f"cluster full: no host{where} admitted VM {vm_id} "
            f"({vcpus} vCPU, {memory} MiB):\n{reasons}"
        )

    # ------------------------------------------------------------------ VMs

    def _host_of(self, vm: VmHandle | str) -> tuple[str, HostState | None]:
        if isinstance(vm, VmHandle):
            return vm.vm_id, self.hosts.get(vm.node_id)
        for host in self.hosts.values():
            if vm in host.known_vms:
                return vm, host
        return vm, None

    async def get(self, vm: VmHandle | str) -> dict[str, Any]:
        vm_id, host = await self._locate(vm)
        result: dict[str, Any] = await self._call(host, "get", vm_id)
        return result

    async def _locate(self, vm: VmHandle | str) -> tuple[str, HostState]:
        vm_id, host = self._host_of(vm)
        if host is None:
            await self.ls()
            vm_id, host = self._host_of(vm_id)
        if host is None:
            raise NotFoundError(f"no VM {vm_id!r} on any host of this cluster")
        if host.node_gone:
            raise HostLostError(f"VM {vm_id} is lost: host {host.hostname} is {host.problem}")
        return vm_id, host

    async def exec(self, vm: VmHandle | str, argv: list[str], **options: Any) -> dict[str, Any]:
        """Run ``argv`` in the VM through its guest agent and wait for it to exit.

        ``options`` are the fields of the host agent's exec request (``env``, ``cwd``,
        ``user``, ``stdin``, ``stdin_b64``, ``timeout_s``, ``output_limit``, ``output``).
        Returns ``exit_code``, ``stdout``, ``stderr``, ``signal``, ``timed_out``, ...
        """
        vm_id, host = await self._locate(vm)
        result: dict[str, Any] = await self._call(host, "exec", vm_id, {"argv": argv, **options})
        return result

    async def stop(self, vm: VmHandle | str) -> None:
        """Stop a VM on its host. ``HostLostError`` if that host is gone."""
        vm_id, host = await self._locate(vm)
        await self._call(host, "stop", vm_id)
        host.known_vms.discard(vm_id)
        host.info_at = 0.0

    async def ls(self) -> list[dict[str, Any]]:
        """Every VM on every host (each with ``host`` and ``node_id``); VMs last seen on a
        host that is now gone are listed with status ``lost``."""

        async def one(host: HostState) -> list[dict[str, Any]]:
            try:
                vms: list[dict[str, Any]] = await self._call(host, "list")
            except HostLostError:
                return [
                    {"vm_id": vm_id, "status": "lost", "problem": host.problem}
                    for vm_id in sorted(host.known_vms)
                ]
            host.known_vms = {v["vm_id"] for v in vms}
            return vms

        hosts = list(self.hosts.values())
        results = await asyncio.gather(*(one(h) for h in hosts))
        out = []
        for host, vms in zip(hosts, results, strict=True):
            for vm in vms:
                out.append({**vm, "host": host.hostname, "node_id": host.node_id})
        return out

    def unhealthy(self) -> dict[str, str]:
        """``{node_id: why}`` of every host currently marked unhealthy."""
        return {h.node_id: h.problem or "unhealthy" for h in self.hosts.values() if not h.healthy}
