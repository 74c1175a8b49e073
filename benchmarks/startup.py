"""Start-up time: ironclaw (jailed and unjailed) against raw firecracker, in one run.

Run as root on a host with /dev/kvm, firecracker and jailer:

    sudo .venv/bin/python benchmarks/startup.py [--runs 20]

Each sample boots the probe guest (ProbeBehaviour.RESET) to completion: spawn -> API ready ->
configure -> InstanceStart -> guest exit -> cleanup. The raw baseline does the same with
firecracker alone (`--api-sock` in a temp dir, plain httpx), so the difference is what the
orchestrator (and the jailer) add. Prints medians and p90 per phase; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from ironclaw_orchestrator.vm import VmConfig, start_firecracker
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.binaries import find_firecracker
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path
from ironclaw_orchestrator.vm.process import ChildProcess


async def raw_once(kernel: Path) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="fc-raw-"))
    sock = tmp / "api.sock"
    t0 = time.perf_counter()
    proc = ChildProcess.spawn(
        [str(find_firecracker()), "--api-sock", str(sock)], stdout_path=tmp / "out"
    )
    api = FirecrackerApi(sock)
    try:
        while True:
            if sock.exists():
                try:
                    await api.describe(timeout_s=0.5)
                    break
                except Exception:
                    pass
            await asyncio.sleep(0.002)
        t1 = time.perf_counter()
        await api.put_machine_config(1, 128)
        await api.put_boot_source(kernel, PROBE_BOOT_ARGS)
        await api.instance_start()
        await proc.wait()
        t2 = time.perf_counter()
    finally:
        proc.kill()
        await proc.wait()
        await api.aclose()
        shutil.rmtree(tmp)
    t3 = time.perf_counter()
    return {"ready": t1 - t0, "boot+run": t2 - t1, "cleanup": t3 - t2, "total": t3 - t0}


async def ironclaw_once(kernel: Path, use_jailer: bool) -> dict[str, float]:
    cfg = VmConfig(
        vm_id=f"bench-{uuid.uuid4().hex[:8]}",
        kernel_path=str(kernel),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
    )
    t0 = time.perf_counter()
    vm = await start_firecracker(cfg, use_jailer=None if use_jailer else False)
    t1 = time.perf_counter()
    try:
        await vm.start_instance()
        await vm.wait()
        t2 = time.perf_counter()
    finally:
        await vm.stop()
    t3 = time.perf_counter()
    return {"ready": t1 - t0, "boot+run": t2 - t1, "cleanup": t3 - t2, "total": t3 - t0}


def report(name: str, samples: list[dict[str, float]]) -> None:
    cols = []
    for key in ("ready", "boot+run", "cleanup", "total"):
        values = sorted(s[key] * 1000 for s in samples)
        p90 = values[int(0.9 * (len(values) - 1))]
        cols.append(f"{key} {statistics.median(values):7.1f} ms (p90 {p90:6.1f})")

    print(f"{name:18s} " + " | ".join(cols))


async def main(runs: int) -> None:
    if os.geteuid() != 0:
        raise SystemExit("run as root (the jailer needs it)")
    kernel = probe_kernel_path(ProbeBehaviour.RESET)
    for _ in range(2):  # warm caches
        await raw_once(kernel)
        await ironclaw_once(kernel, True)
    raw, jailed, unjailed = [], [], []
    for _ in range(runs):  # interleave so drift hits all three alike
        raw.append(await raw_once(kernel))
        jailed.append(await ironclaw_once(kernel, True))
        unjailed.append(await ironclaw_once(kernel, False))
    report("raw firecracker", raw)
    report("ironclaw unjailed", unjailed)
    report("ironclaw jailed", jailed)
    overhead = statistics.median(s["total"] for s in jailed) - statistics.median(
        s["total"] for s in raw
    )
    print(f"jailed overhead over raw firecracker (median total): {overhead * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    asyncio.run(main(parser.parse_args().runs))
