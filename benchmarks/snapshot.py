"""Snapshot restore, warm-pool claims and restore throughput, against raw firecracker, in one run.

Run as root on a host with /dev/kvm, firecracker and jailer:

    sudo .venv/bin/python benchmarks/snapshot.py [--runs 20] [--flight 16] [--total 64]

Set-up: a jailed probe VM (ProbeBehaviour.HALT, 128 MiB) is booted, snapshotted (Full) into
a directory on the jail filesystem, verified once with ``Snapshot.load`` and stopped.

Measured (medians, p90), each to "the restored VM runs":

* raw: firecracker alone, unjailed, driven by a bare Unix-socket HTTP client written here
  (not the project's code): spawn -> API ready -> ``PUT /snapshot/load`` with
  ``resume_vm`` -> ``GET /`` says Running. ``load+resume`` is the part after API ready.
* restore: ``restore_snapshot`` into a fresh jail (own uid/gid, cgroups, netns, chroot,
  staged files, registry record), returning a running VM;
* claim: ``WarmPool(..., snapshot=)`` and ``WarmPool`` booting the probe, ``claim()`` from a
  full pool (the pool is refilled between samples, outside the timing);
* raw+netns: the raw jailer + firecracker with the isolation ironclaw adds by default, made
  here with bare syscalls (nothing from ironclaw; the helpers are ``benchmarks/startup.py``'s):
  a network namespace per VM (unshare in a thread, bind-mounted under /run/netns, ``lo`` down)
  handed to the jailer with ``--netns``, and memory + CPU cgroups (v1) beneath our own, set
  by the jailer's ``--cgroup``. ironclaw / raw+netns is what the same isolation costs
  through ironclaw; ironclaw / raw is an upper bound on what ironclaw adds;
* the raw, raw+netns and restore samples are interleaved after a warm-up (so drift and the
  kernel's deferred clean-up of namespaces and cgroups hit all alike);
* throughput: ``--total`` restore -> running -> stop cycles with ``--flight`` in flight,
  raw, raw+netns and ironclaw alternating for ``--rounds`` rounds (so all see the same host
  load; the load average is printed with each round);
* orchestrator CPU (``time.process_time``, all threads) per restore and per stop, from the
  sequential restore samples, with user/system split and the children's (jailer, VMM) CPU.

Asserts nothing; prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

from startup import PR_SET_CHILD_SUBREAPER, _make_netns, _own_cgroup, _remove_netns

from ironclaw_orchestrator.vm import (
    Snapshot,
    VmConfig,
    WarmPool,
    restore_snapshot,
    start_firecracker,
)
from ironclaw_orchestrator.vm.binaries import find_firecracker, find_jailer
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

#: The raw+netns baseline's cgroups, as ironclaw sets them for a 128 MiB, 1 vCPU VM.
RAW_CGROUPS = ("memory.limit_in_bytes=201326592", "cpu.cfs_period_us=100000",
               "cpu.cfs_quota_us=100000")  # fmt: skip
RAW_CONTROLLERS = ("memory", "cpu")

# --------------------------------------------------------------------------- raw baseline


async def http(
    sock: Path, method: str, path: str, body: dict[str, object] | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.1 request over a Unix socket, by hand."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(sock)), 10)
    try:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        writer.write(head.encode() + b"\r\n" + data)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        payload = await reader.readexactly(length) if length else b""
        return int(status_line.split()[1]), payload
    finally:
        writer.close()


async def raw_once(firecracker: Path, snap: Snapshot) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="fc-raw-snap-"))
    sock = tmp / "api.sock"
    t0 = time.perf_counter()
    out = open(tmp / "out", "wb")  # noqa: SIM115
    proc = await asyncio.create_subprocess_exec(
        str(firecracker),
        "--api-sock",
        str(sock),
        stdin=asyncio.subprocess.PIPE,
        stdout=out,
        stderr=out,
    )
    try:
        while True:
            if sock.exists():
                try:
                    if (await http(sock, "GET", "/"))[0] == 200:
                        break
                except OSError:
                    pass
            await asyncio.sleep(0.001)
        t1 = time.perf_counter()
        status, text = await http(
            sock, "PUT", "/snapshot/load",
            {"snapshot_path": str(snap.state_path), "mem_file_path": str(snap.memory_path),
             "enable_diff_snapshots": False, "resume_vm": True},
        )  # fmt: skip
        assert status == 204, text
        status, text = await http(sock, "GET", "/")
        assert b'"Running"' in text, text
        t2 = time.perf_counter()
    finally:
        proc.kill()
        await proc.wait()
        out.close()
        shutil.rmtree(tmp)
    return {"spawn->running": t2 - t0, "load+resume": t2 - t1}


class RawJailed:
    """The jailer + firecracker by hand: chroot, uid 64999, new PID namespace, files
    hard-linked in. ``isolate`` adds a netns per VM and memory + CPU cgroups (see the doc)."""

    def __init__(
        self, jailer: Path, firecracker: Path, snap: Snapshot, base: Path, *, isolate: bool
    ) -> None:
        self.jailer, self.exec_file = jailer, firecracker.resolve()
        self.snap, self.base = snap, base
        self.isolate = isolate
        self.parent = f"{_own_cgroup('memory')}/raw-bench-snap-{os.getpid()}"

    async def once(self) -> dict[str, float]:
        vm_id = f"raw-{uuid.uuid4().hex[:8]}"
        jail = self.base / self.exec_file.name / vm_id
        root = jail / "root"
        netns = f"/run/netns/{vm_id}" if self.isolate else None
        t0 = time.perf_counter()
        if netns is not None:
            os.makedirs("/run/netns", exist_ok=True)
            await asyncio.to_thread(_make_netns, netns)
        root.mkdir(parents=True)
        for src, name in ((self.snap.memory_path, "memory"), (self.snap.state_path, "vmstate")):
            os.link(src, root / name)
        sock = root / "run" / "firecracker.socket"
        out = open(jail.parent / f"{vm_id}.out", "wb")  # noqa: SIM115
        argv = [str(self.jailer), "--id", vm_id, "--exec-file", str(self.exec_file),
                "--uid", "64999", "--gid", "64999", "--chroot-base-dir", str(self.base),
                "--new-pid-ns"]  # fmt: skip
        if self.isolate:
            argv += ["--cgroup-version", "1", "--parent-cgroup", self.parent, "--netns", str(netns)]
            for setting in RAW_CGROUPS:
                argv += ["--cgroup", setting]
        argv += ["--", "--api-sock", "/run/firecracker.socket"]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=out, stderr=out
        )
        deadline = time.monotonic() + 10
        last: Exception | None = None
        try:
            while True:
                assert time.monotonic() < deadline, f"{sock} never answered: {last!r}"
                if sock.exists():
                    try:
                        if (await http(sock, "GET", "/"))[0] == 200:
                            break
                    except OSError as exc:
                        last = exc
                await asyncio.sleep(0.001)
            body = {"snapshot_path": "/vmstate", "mem_file_path": "/memory",
                    "enable_diff_snapshots": False, "resume_vm": True}  # fmt: skip
            status, text = await http(sock, "PUT", "/snapshot/load", body)
            assert status == 204, text
            t1 = time.perf_counter()
        finally:
            await proc.wait()
            # Blocking clean-up off the event loop, so that 16 in flight do not queue behind it.
            await asyncio.to_thread(self._cleanup, jail, root, out, vm_id, netns)
        return {"spawn->running": t1 - t0}

    def _cleanup(
        self, jail: Path, root: Path, out: IO[bytes], vm_id: str, netns: str | None
    ) -> None:
        # The jailer forked the VMM into its PID namespace and exited; the pid file names it.
        pid_file = root / f"{self.exec_file.name}.pid"
        with contextlib.suppress(OSError, ValueError):
            vmm = int(pid_file.read_text())
            os.kill(vmm, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(vmm, 0)  # ours: main() made us a subreaper
        out.close()
        (jail.parent / f"{vm_id}.out").unlink()
        shutil.rmtree(jail)
        if self.isolate:
            for ctrl in RAW_CONTROLLERS:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(f"/sys/fs/cgroup/{ctrl}/{self.parent}/{vm_id}")
        if netns is not None:
            _remove_netns(netns)

    async def throughput(self, flight: int, total: int) -> float:
        sem = asyncio.Semaphore(flight)

        async def one() -> None:
            async with sem:
                await self.once()

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(total)))
        return total / (time.perf_counter() - t0)

    def close(self) -> None:
        if self.isolate:
            for ctrl in RAW_CONTROLLERS:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(f"/sys/fs/cgroup/{ctrl}/{self.parent}")


# --------------------------------------------------------------------------- ironclaw


async def restore_once(snap: Snapshot | Path, usage: list[float] | None = None) -> dict[str, float]:
    """One restore -> running -> stop; ``usage`` accumulates (user, system, children) CPU."""
    r0 = rusage()
    t0, c0 = time.perf_counter(), time.process_time()
    vm = await restore_snapshot(snap, f"bench-r-{uuid.uuid4().hex[:8]}")
    t1, c1 = time.perf_counter(), time.process_time()
    await vm.stop(timeout_s=0)
    c2 = time.process_time()
    if usage is not None:
        for i, (after, before) in enumerate(zip(rusage(), r0, strict=True)):
            usage[i] += after - before
    return {"restore->running": t1 - t0, "cpu restore": c1 - c0, "cpu stop": c2 - c1}


def rusage() -> tuple[float, float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime, me.ru_stime, kids.ru_utime + kids.ru_stime


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


async def claim_samples(pool: WarmPool, runs: int, prefix: str) -> list[dict[str, float]]:
    out = []
    for _ in range(runs):
        while pool.ready < pool.size:  # refilled between samples, outside the timing
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        vm = await pool.claim(f"{prefix}-{uuid.uuid4().hex[:8]}")
        t1 = time.perf_counter()
        await vm.stop(timeout_s=0)
        out.append({"claim->running": t1 - t0})
    return out


async def throughput(snap: Snapshot, flight: int, total: int) -> float:
    sem = asyncio.Semaphore(flight)

    async def one() -> None:
        async with sem:
            vm = await restore_snapshot(snap, f"bench-t-{uuid.uuid4().hex[:8]}")
            await vm.stop(timeout_s=0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return total / (time.perf_counter() - t0)


def report(name: str, samples: list[dict[str, float]]) -> None:
    for key in samples[0]:
        values = sorted(s[key] * 1000 for s in samples)
        p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
        print(
            f"{name:<28} {key:<18} median {statistics.median(values):7.1f} ms   p90 {p90:7.1f} ms"
        )


async def main(runs: int, flight: int, total: int, rounds: int, workdir: Path) -> None:
    print(load())
    # Jailed VMMs are re-parented to us (ironclaw does the same), so the raw clean-up can reap.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    kernel = probe_kernel_path(ProbeBehaviour.HALT)
    template = VmConfig(
        kernel_path=str(kernel), rootfs_path=None, memory_mb=128, boot_args=PROBE_BOOT_ARGS
    )
    src = await start_firecracker(template.model_copy(update={"vm_id": f"bench-src-{os.getpid()}"}))
    try:
        await src.start_instance()
        await asyncio.sleep(0.1)
        t0 = time.perf_counter()
        await src.snapshot(workdir / "snap")
        print(
            f"snapshot (128 MiB, Full, incl. SHA-256): {(time.perf_counter() - t0) * 1000:.0f} ms"
        )
    finally:
        await src.stop(timeout_s=0)
    t0 = time.perf_counter()
    snap = Snapshot.load(workdir / "snap")
    print(f"Snapshot.load (verify):                 {(time.perf_counter() - t0) * 1000:.0f} ms")
    firecracker = find_firecracker()
    print(f"firecracker {snap.manifest.firecracker_version}, {runs} runs each\n")

    jailer = find_jailer()
    raw_base = workdir / "rj"  # short: the socket path must fit in 107 bytes
    raw_base.mkdir()
    raw = RawJailed(jailer, firecracker, snap, raw_base, isolate=False)
    raw_ns = RawJailed(jailer, firecracker, snap, raw_base, isolate=True)
    try:
        await measure(runs, flight, total, rounds, firecracker, snap, template, raw, raw_ns)
    finally:
        raw_ns.close()


async def measure(
    runs: int,
    flight: int,
    total: int,
    rounds: int,
    firecracker: Path,
    snap: Snapshot,
    template: VmConfig,
    raw: RawJailed,
    raw_ns: RawJailed,
) -> None:
    report("raw firecracker (unjailed)", [await raw_once(firecracker, snap) for _ in range(runs)])
    # Interleaved after a warm-up, as in startup.py: drift (and the kernel's deferred clean-up
    # of the previous contender's namespaces and cgroups) hits all three alike.
    for _ in range(2):
        await raw.once()
        await raw_ns.once()
        await restore_once(snap)
    raw_j: list[dict[str, float]] = []
    raw_n: list[dict[str, float]] = []
    ours: list[dict[str, float]] = []
    usage = [0.0, 0.0, 0.0]
    for _ in range(runs):
        raw_j.append(await raw.once())
        raw_n.append(await raw_ns.once())
        ours.append(await restore_once(snap, usage))
    report("raw jailer+firecracker", raw_j)
    report("raw+netns (+cgroups)", raw_n)
    report("restore into fresh jail", ours)
    u, s, k = (x / runs * 1000 for x in usage)
    print(
        f"{'':<28} {'per restore+stop':<18} user {u:.1f} ms, system {s:.1f} ms; "
        f"jailer+VMM (children) {k:.1f} ms"
    )
    report(
        "restore from a directory",
        [await restore_once(snap.path) for _ in range(max(3, runs // 4))],
    )
    async with WarmPool(template, size=2, snapshot=snap) as pool:
        report("warm pool claim (snapshot)", await claim_samples(pool, runs, "bench-ps"))
    async with WarmPool(template, size=2) as pool:
        report("warm pool claim (boot)", await claim_samples(pool, runs, "bench-pb"))
    print(f"\n{flight} in flight, {total} total, each spawn -> running -> stopped and removed:")
    raws: list[float] = []
    raw_nss: list[float] = []
    ourt: list[float] = []
    for i in range(rounds):
        raws.append(await raw.throughput(flight, total))
        raw_nss.append(await raw_ns.throughput(flight, total))
        ourt.append(await throughput(snap, flight, total))
        print(
            f"  round {i + 1}: raw {raws[-1]:5.0f}/s, raw+netns {raw_nss[-1]:5.0f}/s, restore "
            f"into fresh jail {ourt[-1]:5.0f}/s ({load()})"
        )
    med = {
        "raw": statistics.median(raws),
        "raw+netns": statistics.median(raw_nss),
        "ironclaw": statistics.median(ourt),
    }
    print("  median: " + ", ".join(f"{k} {v:.0f} restores/s" for k, v in med.items()))
    latency = {
        "raw": statistics.median(s["spawn->running"] for s in raw_j),
        "raw+netns": statistics.median(s["spawn->running"] for s in raw_n),
    }
    ours_latency = statistics.median(s["restore->running"] for s in ours)
    print(
        "ratios ironclaw / baseline: "
        + ", ".join(
            f"restore->running vs {b} {ours_latency / latency[b]:.2f}x, "
            f"restores/s vs {b} {med['ironclaw'] / med[b]:.2f}x"
            for b in ("raw", "raw+netns")
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--flight", type=int, default=16)
    parser.add_argument("--total", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved throughput rounds.")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/jail"),
        help="Parent of the snapshot directory (on the jail filesystem).",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="icb-", dir=args.workdir))
    os.environ.setdefault("IRONCLAW_STATE_DIR", str(work / "registry"))  # a private registry
    try:
        asyncio.run(main(args.runs, args.flight, args.total, args.rounds, work))
    finally:
        shutil.rmtree(work)
