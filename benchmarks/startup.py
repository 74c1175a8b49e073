"""Start-up cost: ironclaw against the raw jailer + firecracker, interleaved in one run.

Run as root on a host with /dev/kvm, firecracker and jailer:

    sudo .venv/bin/python benchmarks/startup.py [--runs 20] [--concurrency 16] [--json]

The raw baseline drives the jailer and firecracker with a bare Unix-socket HTTP client written
here (no httpx, nothing from ironclaw's process, API or jail code): the jailer gets the same
isolation flags ironclaw uses by default (uid/gid, new PID namespace, memory and CPU cgroups
under our own cgroup), the probe kernel is linked into the jail, the VM is configured and
booted, its exit is awaited and the jail and cgroups are removed. Plain raw skips the private
network namespace ironclaw gives every VM; ``raw+netns`` also makes one per VM (unshare in a
thread, bind-mounted under /run/netns, ``lo`` down as ``ip netns add`` leaves it) and hands
it to the jailer with ``--netns``: ironclaw / raw+netns compares the same isolation,
ironclaw / raw is an upper bound on what ironclaw adds.

The contenders alternate in a rotating order, each lifecycle (and each batch) after a
``--gap-ms`` pause: the first cgroup migration after a quiet spell waits an RCU grace period
(~8 ms), so a run right after another contender's would otherwise inherit its kernel state.

Phases per lifecycle: ``ready`` (spawn -> API answering and pre-configured), ``boot`` (InstanceStart
-> guest exit reaped), ``cleanup``, ``total``. Then 16 lifecycles at once (VMs/s), orchestrator
CPU per lifecycle, orchestrator RSS per live VM, VMM RSS, and the CLI's whole-process wall time.
Medians and p90; ratios are ironclaw / raw. Asserts nothing: timings never live in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

RAW_BASE = Path("/var/jail")
UID = GID = 64999  # the raw baseline's jail user (ironclaw allocates its own from the registry)
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNET, MS_BIND, MNT_DETACH = 0x40000000, 4096, 2

Sample = dict[str, float]


# --- the raw baseline: nothing from ironclaw below this line but the probe kernel -------------


class BareClient:
    """HTTP/1.1 over a Unix socket in a few lines: one keep-alive connection, JSON bodies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str) -> BareClient:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def call(self, method: str, path: str, body: dict[str, object] | None = None) -> int:
        data = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        payload = await self.reader.readexactly(length) if length else b""
        if status >= 400:
            raise RuntimeError(f"{method} {path}: {status} {payload!r}")
        return status

    def close(self) -> None:
        self.writer.close()


def _own_cgroup(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path.strip("/")
    raise RuntimeError(f"no v1 {controller} cgroup")


async def _pidfd_wait(pid: int) -> None:
    fd = os.pidfd_open(pid)
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, done.set_result, None)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    os.waitpid(pid, 0)


_libc = ctypes.CDLL(None, use_errno=True)


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _make_netns(path: str) -> None:
    """In a throw-away thread: a new netns for the thread, bound on ``path`` (``lo`` stays
    down, as ``ip netns add`` leaves it and as ironclaw makes a VM's own namespace)."""

    def body() -> None:
        _check(_libc.unshare(CLONE_NEWNET), "unshare")
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
        ns = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        _check(_libc.mount(ns, path.encode(), None, MS_BIND, None), "mount")

    errors: list[BaseException] = []

    def run() -> None:
        try:
            body()
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def _remove_netns(path: str) -> None:
    _check(_libc.umount2(path.encode(), MNT_DETACH), "umount2")
    os.unlink(path)


class Raw:
    def __init__(self, jailer: Path, firecracker: Path, kernel: Path, netns: bool = False) -> None:
        self.netns = netns
        self.jailer = jailer
        self.exec_file = firecracker.resolve()  # the jailer names the jail after the real file
        self.kernel = kernel
        self.parent = f"{_own_cgroup('memory')}/raw-bench"
        self.log_dir = Path(tempfile.mkdtemp(prefix="raw-bench-"))

    async def lifecycle(self) -> Sample:
        vm_id = f"raw-{uuid.uuid4().hex[:10]}"
        jail = RAW_BASE / self.exec_file.name / vm_id
        root = jail / "root"
        t0 = time.perf_counter()
        netns = f"/run/netns/{vm_id}" if self.netns else None
        if netns is not None:
            os.makedirs("/run/netns", exist_ok=True)
            await asyncio.to_thread(_make_netns, netns)
        argv = [
            str(self.jailer), "--id", vm_id, "--exec-file", str(self.exec_file),
            "--uid", str(UID), "--gid", str(GID), "--chroot-base-dir", str(RAW_BASE),
            "--new-pid-ns", "--cgroup-version", "1", "--parent-cgroup", self.parent,
            "--cgroup", f"memory.limit_in_bytes={192 << 20}",
            "--cgroup", "cpu.cfs_period_us=100000", "--cgroup", "cpu.cfs_quota_us=100000",
            *(["--netns", netns] if netns is not None else []),
            "--", "--api-sock", "/run/firecracker.socket",
        ]  # fmt: skip
        out = os.open(self.log_dir / f"{vm_id}.out", os.O_WRONLY | os.O_CREAT, 0o600)
        actions = [(os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)]
        jailer_pid = os.posix_spawn(argv[0], argv, {}, file_actions=actions)
        os.close(out)
        sock = root / "run/firecracker.socket"
        client = None
        while client is None:
            if sock.exists():
                try:
                    client = await BareClient.connect(str(sock))
                    await client.call("GET", "/")
                except OSError:
                    client = None
            if client is None:
                await asyncio.sleep(0.001)
        os.link(self.kernel, root / "vmlinux")
        await client.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        await client.call(
            "PUT", "/boot-source", {"kernel_image_path": "/vmlinux", "boot_args": PROBE_BOOT_ARGS}
        )
        t1 = time.perf_counter()
        os.waitpid(jailer_pid, 0)  # it exits once the VMM is forked into its PID namespace
        vmm = int((root / f"{self.exec_file.name}.pid").read_text())
        await client.call("PUT", "/actions", {"action_type": "InstanceStart"})
        await _pidfd_wait(vmm)
        client.close()
        t2 = time.perf_counter()
        shutil.rmtree(jail)
        for ctrl in ("memory", "cpu"):
            os.rmdir(f"/sys/fs/cgroup/{ctrl}/{self.parent}/{vm_id}")
        if netns is not None:
            _remove_netns(netns)
        t3 = time.perf_counter()
        return {"ready": t1 - t0, "boot": t2 - t1, "cleanup": t3 - t2, "total": t3 - t0}

    def close(self) -> None:
        shutil.rmtree(self.log_dir, ignore_errors=True)
        for ctrl in ("memory", "cpu"):
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(f"/sys/fs/cgroup/{ctrl}/{self.parent}")
        with contextlib.suppress(OSError):  # ironclaw's jails live there too
            (RAW_BASE / self.exec_file.name).rmdir()


# --- ironclaw ----------------------------------------------------------------------------------


class Ironclaw:
    def __init__(self, kernel: Path) -> None:
        self.kernel = kernel

    def config(self, behaviour_kernel: Path | None = None) -> object:
        from ironclaw_orchestrator.vm import VmConfig

        return VmConfig(
            vm_id=f"bench-{uuid.uuid4().hex[:10]}",
            kernel_path=str(behaviour_kernel or self.kernel),
            rootfs_path=None,
            memory_mb=128,
            boot_args=PROBE_BOOT_ARGS,
        )

    async def lifecycle(self) -> Sample:
        from ironclaw_orchestrator.vm import start_firecracker

        cfg = self.config()
        t0 = time.perf_counter()
        vm = await start_firecracker(cfg, use_jailer=True)  # type: ignore[arg-type]
        t1 = time.perf_counter()
        try:
            await vm.start_instance()
            await vm.wait()
            t2 = time.perf_counter()
        finally:
            await vm.stop()
        t3 = time.perf_counter()
        return {"ready": t1 - t0, "boot": t2 - t1, "cleanup": t3 - t2, "total": t3 - t0}


# --- measurement ------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    return {"median": statistics.median(ordered), "p90": p90}


async def concurrent(
    run: Callable[[], Awaitable[Sample]], n: int, batches: int
) -> dict[str, float]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(batches):
        await asyncio.gather(*(run() for _ in range(n)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"vms_per_s": n * batches / wall, "cpu_ms_per_vm": cpu * 1000 / (n * batches)}


def _rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def memory(n: int) -> dict[str, float]:
    """Orchestrator RSS per live ironclaw VM and VMM RSS, with ``n`` halted guests up at once."""
    from ironclaw_orchestrator.vm import VmConfig, start_firecracker

    kernel = probe_kernel_path(ProbeBehaviour.HALT)

    def cfg() -> VmConfig:
        return VmConfig(
            vm_id=f"bench-{uuid.uuid4().hex[:10]}", kernel_path=str(kernel), rootfs_path=None,
            memory_mb=128, boot_args=PROBE_BOOT_ARGS,
        )  # fmt: skip

    warm = await start_firecracker(cfg(), use_jailer=True)
    await warm.start_instance()
    await warm.stop()
    before = _rss_kib()
    vms = await asyncio.gather(*(start_firecracker(cfg(), use_jailer=True) for _ in range(n)))
    try:
        await asyncio.gather(*(vm.start_instance() for vm in vms))
        await asyncio.sleep(0.2)
        after = _rss_kib()
        vmm = statistics.median(_rss_kib(vm.pid) for vm in vms)
    finally:
        await asyncio.gather(*(vm.stop() for vm in vms))
    return {"orchestrator_rss_kib_per_vm": (after - before) / n, "vmm_rss_kib": vmm}


def cli_wall(runs: int) -> dict[str, dict[str, float]]:
    exe = Path(sys.executable)
    ironclaw = exe.with_name("ironclaw")
    cmds = {
        "cli_import": [str(exe), "-c", "import ironclaw_orchestrator.cli"],
        "cli_vm_run": [str(ironclaw), "vm", "run", "--id", "ID"],
    }
    out: dict[str, dict[str, float]] = {}
    for name, cmd in cmds.items():
        samples = []
        for _ in range(runs):
            argv = [c.replace("ID", f"bench-cli-{uuid.uuid4().hex[:8]}") for c in cmd]
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            samples.append(time.perf_counter() - t0)
        out[name] = _stats(samples)
    return out


async def main(args: argparse.Namespace) -> dict[str, object]:
    if os.geteuid() != 0:
        raise SystemExit("run as root (the jailer needs it)")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # the jailed VMM is re-parented to us
    from ironclaw_orchestrator.vm.binaries import find_firecracker, find_jailer

    kernel = probe_kernel_path(ProbeBehaviour.RESET)
    raw = Raw(find_jailer(), find_firecracker(), kernel)
    raw_ns = Raw(find_jailer(), find_firecracker(), kernel, netns=True)
    ours = Ironclaw(kernel)
    contenders: dict[str, Callable[[], Awaitable[Sample]]] = {
        "raw": raw.lifecycle, "raw+netns": raw_ns.lifecycle, "ironclaw": ours.lifecycle,
    }  # fmt: skip
    result: dict[str, object] = {}
    try:
        for _ in range(3):  # warm caches
            for run in contenders.values():
                await run()
        seq: dict[str, list[Sample]] = {who: [] for who in contenders}
        names = list(contenders)
        for i in range(args.runs):
            # Interleaved, so drift hits all alike; the order rotates and each lifecycle
            # begins after a pause, so none inherits another's kernel state (a cgroup
            # migration just before makes the jailer's own one skip an RCU grace period).
            for who in names[i % len(names) :] + names[: i % len(names)]:
                await asyncio.sleep(args.gap_ms / 1000)
                seq[who].append(await contenders[who]())
        phases = {
            who: {k: _stats([s[k] for s in samples]) for k in ("ready", "boot", "cleanup", "total")}
            for who, samples in seq.items()
        }
        result["sequential_s"] = phases
        conc: dict[str, list[dict[str, float]]] = {who: [] for who in contenders}
        for i in range(args.batches):
            for who in names[i % len(names) :] + names[: i % len(names)]:
                await asyncio.sleep(args.gap_ms / 1000)
                conc[who].append(await concurrent(contenders[who], args.concurrency, 1))
        result["concurrent"] = {
            who: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            for who, rows in conc.items()
        }
        result["memory"] = await memory(args.concurrency)
    finally:
        raw.close()
        raw_ns.close()
    if not args.no_cli:
        result["cli_s"] = cli_wall(args.cli_runs)
    med = {who: {k: v["median"] for k, v in p.items()} for who, p in phases.items()}
    c = result["concurrent"]
    assert isinstance(c, dict)
    result["ratios"] = {
        f"{phase} vs {base}": med["ironclaw"][phase] / med[base][phase]
        for base in ("raw", "raw+netns")
        for phase in ("ready", "total")
    } | {
        f"concurrent_vms_per_s vs {base}": c["ironclaw"]["vms_per_s"] / c[base]["vms_per_s"]
        for base in ("raw", "raw+netns")
    }
    return result


def render(result: dict[str, object]) -> None:
    seq = result["sequential_s"]
    assert isinstance(seq, dict)
    print("sequential lifecycles (ms, median / p90):")
    for who, phases in seq.items():
        cols = "  ".join(
            f"{k} {v['median'] * 1000:6.1f} / {v['p90'] * 1000:6.1f}" for k, v in phases.items()
        )
        print(f"  {who:9s} {cols}")
    conc = result["concurrent"]
    assert isinstance(conc, dict)
    for who, row in conc.items():
        print(f"  {who:9s} concurrent: {row['vms_per_s']:6.1f} VMs/s, "
              f"orchestrator CPU {row['cpu_ms_per_vm']:5.1f} ms/VM")  # fmt: skip
    mem = result["memory"]
    assert isinstance(mem, dict)
    print(f"  orchestrator RSS per live VM {mem['orchestrator_rss_kib_per_vm']:.0f} KiB, "
          f"VMM RSS {mem['vmm_rss_kib']:.0f} KiB")  # fmt: skip
    if "cli_s" in result:
        cli = result["cli_s"]
        assert isinstance(cli, dict)
        for name, v in cli.items():
            print(f"  {name}: {v['median'] * 1000:.0f} ms (p90 {v['p90'] * 1000:.0f})")
    ratios = result["ratios"]
    assert isinstance(ratios, dict)
    print("ratios ironclaw / baseline: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument(
        "--gap-ms", type=float, default=50.0, help="pause before each lifecycle or batch"
    )
    parser.add_argument("--cli-runs", type=int, default=10)
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI wall-time figures")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    ns = parser.parse_args()
    figures = asyncio.run(main(ns))
    if ns.json:
        print(json.dumps(figures, indent=2))
    else:
        render(figures)
