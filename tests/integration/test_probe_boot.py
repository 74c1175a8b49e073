"""Boot the probe guest with the real firecracker binary, unjailed (``--no-api``).

These tests depend only on :mod:`ironclaw_orchestrator.vm.probe` and plain asyncio
subprocesses, not on the project's launch code. Every VM is killed and reaped, and its
directory removed, by the ``boot`` fixture, also when a test fails. Deadlines below only
stop a broken test from hanging; no test asserts how fast anything happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ironclaw_orchestrator.vm.probe import (
    COUNT_PREFIX,
    PROBE_BOOT_ARGS,
    READY_LINE,
    ProbeBehaviour,
    parse_counts,
    probe_kernel_path,
)

pytestmark = pytest.mark.integration

#: Failsafe for waits; generous because CI hosts can be slow and nested.
DEADLINE_S = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def firecracker_or_skip() -> str:
    """Return the firecracker binary to use, or skip the test saying what is missing."""
    configured = os.environ.get("IRONCLAW_FIRECRACKER")
    binary = configured or shutil.which("firecracker")
    if not binary:
        pytest.skip("firecracker not found: put it on PATH or set IRONCLAW_FIRECRACKER")
    if not os.access(binary, os.X_OK):
        pytest.skip(f"firecracker binary {binary} does not exist or is not executable")
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm does not exist: KVM is not available on this host")
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        pytest.skip(f"/dev/kvm is not accessible ({exc}): run as root or join the kvm group")
    return binary


@dataclass
class Vm:
    """One unjailed firecracker process and the directory holding its files."""

    proc: asyncio.subprocess.Process
    workdir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def stderr_text(self) -> str:
        """What firecracker wrote to stderr so far (for failure messages)."""
        try:
            return (self.workdir / "stderr.txt").read_text(errors="replace")
        except OSError:
            return ""

    async def wait_for_line(self, wanted: str) -> None:
        """Read guest console lines until ``wanted`` appears (fails on EOF)."""
        assert self.proc.stdout is not None

        async def read() -> None:
            assert self.proc.stdout is not None
            while wanted not in self.lines:
                raw = await self.proc.stdout.readline()
                if not raw:
                    rc = await self.proc.wait()
                    pytest.fail(
                        f"firecracker exited ({rc}) before printing {wanted!r}; "
                        f"stdout={self.lines!r} stderr={self.stderr_text!r}"
                    )
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))

        await asyncio.wait_for(read(), DEADLINE_S)

    async def wait_for_exit(self) -> int:
        """Read the rest of the console output and return the exit status."""
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), DEADLINE_S)
        self.lines += rest.decode(errors="replace").splitlines()
        return await asyncio.wait_for(self.proc.wait(), DEADLINE_S)

    def status_kib(self, key: str) -> int:
        """A ``kB`` value from ``/proc/<pid>/status`` (e.g. ``VmRSS``)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise AssertionError(f"{key} missing from /proc/{self.proc.pid}/status")

    def vcpu_threads(self) -> list[Path]:
        """``/proc/<pid>/task/<tid>`` of the vCPU threads (firecracker names them fc_vcpu N)."""
        tasks = Path(f"/proc/{self.proc.pid}/task")
        return [t for t in tasks.iterdir() if (t / "comm").read_text().startswith("fc_vcpu")]


def cpu_ticks(task: Path) -> int:
    """utime + stime of a thread, in clock ticks."""
    stat = (task / "stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def thread_state(task: Path) -> str:
    stat = (task / "stat").read_text()
    return stat[stat.rindex(")") + 2]


Boot = Callable[..., Awaitable[Vm]]


@pytest.fixture
async def boot() -> AsyncIterator[Boot]:
    """Start probe VMs; on teardown kill and reap each one and remove its files."""
    binary = firecracker_or_skip()
    vms: list[Vm] = []
    cache_dir = Path(tempfile.mkdtemp(prefix="ironclaw-probe-test-cache-"))

    async def start(behaviour: ProbeBehaviour, touch_mib: int = 0, mem_size_mib: int = 128) -> Vm:
        kernel = probe_kernel_path(behaviour, touch_mib, cache_dir=cache_dir)
        workdir = Path(tempfile.mkdtemp(prefix="ironclaw-probe-test-"))
        config = {
            "boot-source": {"kernel_image_path": str(kernel), "boot_args": PROBE_BOOT_ARGS},
            "drives": [],
            "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_size_mib},
        }
        (workdir / "config.json").write_text(json.dumps(config))
        with open(workdir / "stderr.txt", "wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                binary,
                "--no-api",
                "--config-file",
                str(workdir / "config.json"),
                # A pipe, not /dev/null: firecracker registers stdin with epoll for the
                # serial console and warns about files that cannot be polled.
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=workdir,
            )
        vm = Vm(proc, workdir)
        vms.append(vm)
        return vm

    try:
        yield start
    finally:
        problems = []
        for vm in vms:
            if vm.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    vm.proc.kill()
            await vm.proc.wait()
            if vm.proc.stdin is not None:
                vm.proc.stdin.close()
            sockets = [p for p in vm.workdir.rglob("*") if p.is_socket()]
            if sockets:
                problems.append(f"sockets left behind: {sockets}")
            shutil.rmtree(vm.workdir, ignore_errors=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
        problems += [f"pid {vm.proc.pid} not reaped" for vm in vms if vm.proc.returncode is None]
        assert not problems, problems


async def test_reset_prints_ready_line_and_exits_zero(boot: Boot) -> None:
    vm = await boot(ProbeBehaviour.RESET)
    rc = await vm.wait_for_exit()
    assert vm.lines[:1] == [READY_LINE], vm.stderr_text
    assert rc == 0, vm.stderr_text


async def test_touch_then_reset(boot: Boot) -> None:
    vm = await boot(ProbeBehaviour.RESET, touch_mib=8, mem_size_mib=128)
    rc = await vm.wait_for_exit()
    assert vm.lines[:2] == [READY_LINE, "IRONCLAW-PROBE-TOUCHED 8"], vm.stderr_text
    assert rc == 0, vm.stderr_text


async def test_halt_keeps_running_with_idle_vcpu(boot: Boot) -> None:
    vm = await boot(ProbeBehaviour.HALT)
    await vm.wait_for_line(READY_LINE)
    (vcpu,) = vm.vcpu_threads()

    async def until_vcpu_sleeps() -> None:
        while thread_state(vcpu) != "S":  # blocked in KVM_RUN on hlt
            await asyncio.sleep(0.05)

    await asyncio.wait_for(until_vcpu_sleeps(), DEADLINE_S)
    assert vm.proc.returncode is None


async def test_spin_keeps_running_and_burns_cpu(boot: Boot) -> None:
    vm = await boot(ProbeBehaviour.SPIN)
    await vm.wait_for_line(READY_LINE)
    (vcpu,) = vm.vcpu_threads()
    start = cpu_ticks(vcpu)

    async def until_vcpu_used_cpu() -> None:
        # A halted vCPU uses (almost) no CPU; a spinning one accumulates it steadily.
        while cpu_ticks(vcpu) - start < CLK_TCK // 2:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(until_vcpu_used_cpu(), DEADLINE_S)
    assert vm.proc.returncode is None


async def test_touch_grows_vmm_rss(boot: Boot) -> None:
    touch_mib = 64
    idle = await boot(ProbeBehaviour.HALT, touch_mib=0, mem_size_mib=256)
    await idle.wait_for_line(READY_LINE)
    toucher = await boot(ProbeBehaviour.HALT, touch_mib=touch_mib, mem_size_mib=256)
    await toucher.wait_for_line(f"IRONCLAW-PROBE-TOUCHED {touch_mib}")
    assert toucher.lines[0] == READY_LINE

    grown_kib = toucher.status_kib("VmRSS") - idle.status_kib("VmRSS")
    # Every touched page is resident before the TOUCHED line is printed, so the growth is
    # touch_mib MiB; 1 MiB of slack absorbs VMM pages the two processes touch differently.
    assert grown_kib >= (touch_mib - 1) * 1024, grown_kib
    assert idle.proc.returncode is None and toucher.proc.returncode is None


async def test_count_prints_consecutive_numbers_with_carry(boot: Boot) -> None:
    vm = await boot(ProbeBehaviour.COUNT)
    await vm.wait_for_line(READY_LINE)
    await vm.wait_for_line(f"{COUNT_PREFIX} 0000000012")  # past the first decimal carry
    counts = parse_counts("\n".join(vm.lines) + "\n")
    assert counts == list(range(13)), vm.lines
    assert vm.proc.returncode is None
