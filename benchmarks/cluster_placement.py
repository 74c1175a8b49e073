"""VMs placed per second: through the Ray cluster vs the host agent vs the local library.

Run as root on a host with /dev/kvm, firecracker, jailer and the ``[ray]`` extra:

    sudo .venv/bin/python benchmarks/cluster_placement.py [--vms 24] [--concurrency 6] [--json]

Three ways to start the same detached probe VMs (each owned by a supervisor process), timed
from the first request until every VM runs, interleaved in rounds in one run:

* ``library``: :func:`spawn_supervisor` called directly (what ``ironclaw vm start`` does);
* ``agent``: ``POST /v1/vms?start=true`` to one host agent over its Unix socket;
* ``cluster``: :meth:`Cluster.start_vm` on a local Ray cluster of three nodes (head + two
  workers), each with its own agent, all on this machine: placement (power of K choices)
  plus a Ray actor call plus the agent.

and, as the baseline, ``raw``: whole lifecycles (spawn, configure, boot, guest exit, cleanup)
of the raw jailer + firecracker driven by the bare socket client of ``benchmarks/startup.py``
(nothing of ironclaw's), at the same concurrency. Raw includes boot-to-exit and cleanup that
the others do later, untimed; the others add a supervisor process per VM (a Python
interpreter start), which is the price of VMs that outlive the agent.

VMs are stopped between rounds (not timed). Asserts nothing: timings never live in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from ironclaw_orchestrator.cluster import HOST_RESOURCE, Cluster, HostAgentClient
from ironclaw_orchestrator.cluster.client import AGENT_SOCKET_ENV
from ironclaw_orchestrator.detach import spawn_supervisor, stop_detached
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import VmConfig
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path
from ironclaw_orchestrator.vm.process import become_subreaper

KERNEL = probe_kernel_path(ProbeBehaviour.HALT)


def probe(vm_id: str) -> dict[str, Any]:
    return {
        "vm_id": vm_id,
        "kernel_path": str(KERNEL),
        "rootfs_path": None,
        "memory_mb": 128,
        "boot_args": PROBE_BOOT_ARGS,
    }


class Agent:
    """One ``ironclaw serve`` with private socket, state, run dir and chroot base."""

    def __init__(self, name: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"icb{name}-", dir="/tmp"))
        self.socket = self.root / "agent.sock"
        (self.root / "jail").mkdir()
        argv = [sys.executable, "-m", "ironclaw_orchestrator.cli", "serve"]
        argv += ["--socket", str(self.socket), "--state-dir", str(self.root / "state")]
        argv += ["--run-dir", str(self.root / "run"), "--chroot-base", str(self.root / "jail")]
        argv += ["--image-dir", str(KERNEL.parent), "--cpu-overcommit", "32"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://agent") as c:
            for _ in range(600):
                with contextlib.suppress(httpx.TransportError):
                    if c.get("/v1/host").status_code == 200:
                        return
                time.sleep(0.1)
        raise SystemExit(f"agent {name} did not start")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        shutil.rmtree(self.root, ignore_errors=True)


async def timed(n: int, concurrency: int, start: Callable[[str], Awaitable[Any]]) -> float:
    """Seconds to get ``n`` VMs running, ``concurrency`` starts in flight at a time."""
    gate = asyncio.Semaphore(concurrency)
    run = uuid.uuid4().hex[:6]

    async def one(i: int) -> Any:
        async with gate:
            return await start(f"b-{run}-{i}")

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return time.perf_counter() - t0


def _raw_baseline() -> Any:
    """``startup.Raw``: the bare-socket jailer + firecracker lifecycle (the RESET probe)."""
    spec = importlib.util.spec_from_file_location("startup", Path(__file__).with_name("startup.py"))
    assert spec is not None and spec.loader is not None
    startup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(startup)
    from ironclaw_orchestrator.vm.binaries import find_firecracker, find_jailer

    return startup.Raw(find_jailer(), find_firecracker(), probe_kernel_path(ProbeBehaviour.RESET))


async def main(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster as RayCluster

    become_subreaper()
    agents = [Agent(z) for z in "abc"]
    lib_root = Path(tempfile.mkdtemp(prefix="icblib-", dir="/tmp"))
    registry = Registry(lib_root / "state")
    os.environ["IRONCLAW_RUN_DIR"] = str(lib_root / "run")
    (lib_root / "jail").mkdir()
    rc: Any = None
    try:
        node_args = [
            {
                "num_cpus": 1,
                "resources": {HOST_RESOURCE: 1},
                "env_vars": {AGENT_SOCKET_ENV: str(a.socket)},
                "object_store_memory": 80 * 2**20,
            }
            for a in agents
        ]
        os.environ["RAY_TMPDIR"] = str(lib_root)  # Ray's session files, removed at the end
        head = {**node_args[0], "include_dashboard": False}
        rc = RayCluster(initialize_head=True, head_node_args=head)
        for extra in node_args[1:]:
            rc.add_node(**extra)
        rc.wait_for_nodes()
        ray.init(address=rc.address, namespace="ironclaw", log_to_driver=False)
        cluster = await Cluster.connect()
        agent = HostAgentClient(socket_path=agents[0].socket)
        jail = {"chroot_base_dir": str(lib_root / "jail")}

        lib_ids: list[str] = []
        agent_ids: list[str] = []
        handles: list[Any] = []

        async def via_library(vm_id: str) -> None:
            await spawn_supervisor(VmConfig(**probe(vm_id), jailer=jail), registry)
            lib_ids.append(vm_id)

        async def via_agent(vm_id: str) -> None:
            await agent.create(probe(vm_id))
            agent_ids.append(vm_id)

        async def via_cluster(vm_id: str) -> None:
            handles.append(await cluster.start_vm(probe(vm_id)))

        async def cleanup() -> None:
            await asyncio.gather(*(stop_detached(registry, i) for i in lib_ids))
            await asyncio.gather(*(agent.stop(i) for i in agent_ids))
            await asyncio.gather(*(h.stop() for h in handles))
            lib_ids.clear()
            agent_ids.clear()
            handles.clear()

        raw = _raw_baseline()

        async def via_raw(vm_id: str) -> None:
            await raw.lifecycle()

        paths = {
            "raw": via_raw,
            "library": via_library,
            "agent": via_agent,
            "cluster": via_cluster,
        }
        seconds: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(args.rounds):
            for name, start in paths.items():
                seconds[name].append(await timed(args.vms, args.concurrency, start))
                await cleanup()
        await agent.close()
        raw.close()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if rc is not None:
            rc.shutdown()
        for a in agents:
            a.close()
        shutil.rmtree(lib_root, ignore_errors=True)
    rates = {k: args.vms / statistics.median(v) for k, v in seconds.items()}
    return {
        "vms": args.vms,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "vms_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratio_to_library": {k: round(v / rates["library"], 2) for k, v in rates.items()},
        "seconds": {k: [round(s, 3) for s in v] for k, v in seconds.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--vms", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    result = asyncio.run(main(parser.parse_args()))
    if parser.parse_args().json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['vms']} probe VMs, {result['concurrency']} at a time, median of "
            f"{result['rounds']} rounds:"
        )
        for name, rate in result["vms_per_s"].items():
            print(
                f"  {name:8} {rate:7.1f} VMs/s  ({result['ratio_to_library'][name]:.2f}x library)"
            )
