"""Fault injection: VMM and orchestrator killed at every stage; gc leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from leftovers import leftovers

from ironclaw_orchestrator.errors import VmExitedError
from ironclaw_orchestrator.gc import GcReport, collect_garbage
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import JailerConfig, VmConfig, start_firecracker
from ironclaw_orchestrator.vm import jailer as jailer_mod
from ironclaw_orchestrator.vm.jailer import JailFile, start_with_jailer
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path
from ironclaw_orchestrator.vm.process import ChildProcess, become_subreaper

pytestmark = pytest.mark.integration


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("IRONCLAW_STATE_DIR", str(path))
    return path


def halt_config(vm_id: str) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        require_sandbox=True,
    )


async def test_vmm_killed_during_start(
    vm_id: str, chroot_base: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_wait_ready = jailer_mod.wait_ready
    made: list[str] = []

    async def kill_vmm_then_wait(process: ChildProcess, *args: Any, **kwargs: Any) -> None:
        made.extend(leftovers(vm_id))  # what the start had made by then
        os.kill(process.pid, signal.SIGKILL)  # the VMM dies between spawn and API ready
        await real_wait_ready(process, *args, **kwargs)

    monkeypatch.setattr(jailer_mod, "wait_ready", kill_vmm_then_wait)
    kernel = probe_kernel_path(ProbeBehaviour.HALT)
    with pytest.raises(VmExitedError) as info:
        await start_with_jailer(
            JailerConfig(jailer_id=vm_id),
            files=[JailFile(kernel, PurePosixPath("/vmlinux"))],
        )
    error = info.value
    assert (error.exit_code, error.vm_id) == (-9, vm_id)
    message = str(error)
    assert message.startswith(f"VM {vm_id}: ") and "exited with signal 9" in message, message
    assert "before its API was ready" in message and "--- output (" in message, message
    # Each kind of resource existed when the VMM died, and the failed start removed it.
    # (Its namespace has no name: it went with the VMM and the closed probe.)
    assert {k for k in kinds(made)} >= {"process", "jail dir", "cgroup"}, made
    assert leftovers(vm_id) == []


async def test_vmm_killed_after_boot_and_during_stop(
    vm_id: str, chroot_base: Path, state_dir: Path
) -> None:
    vm = await start_firecracker(halt_config(vm_id))
    await vm.start_instance()
    made = leftovers(vm_id, state_dirs=[state_dir])
    os.kill(vm.pid, signal.SIGKILL)
    assert await vm.wait() == -9
    await vm.stop()
    assert kinds(made) >= {"process", "jail dir", "cgroup", "registry record"}, made
    assert leftovers(vm_id, state_dirs=[state_dir]) == []

    vm = await start_firecracker(halt_config(vm_id))
    await vm.start_instance()
    stopping = asyncio.ensure_future(vm.stop(timeout_s=2))
    await asyncio.sleep(0.05)  # stop is waiting for the guest to honour Ctrl-Alt-Del
    os.kill(vm.pid, signal.SIGKILL)
    assert await stopping == -9
    assert leftovers(vm_id, state_dirs=[state_dir]) == []


ORCHESTRATOR = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    from ironclaw_orchestrator.vm import VmConfig, start_firecracker
    from ironclaw_orchestrator.vm import jailer
    from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

    ids, crash_at = sys.argv[1].split(","), sys.argv[2]
    real_start = jailer.start_with_jailer

    async def crashing_start(cfg, **kw):
        user = kw.pop("on_change", None)
        def hook(res):
            if user is not None:
                user(res)
            if crash_at == "jail" and res.jail_dir is not None:
                os.kill(os.getpid(), signal.SIGKILL)  # orchestrator dies mid-start
        return await real_start(cfg, on_change=hook, **kw)

    import ironclaw_orchestrator.vm as vm_mod
    vm_mod.start_with_jailer = crashing_start

    from ironclaw_orchestrator.vm import cleanup
    if crash_at == "claim":  # dies with the jail half-made: marked, not yet renamed into place
        cleanup.rename_noreplace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)

    async def main():
        vms = []
        for vm_id in ids:
            cfg = VmConfig(vm_id=vm_id, kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
                           rootfs_path=None, memory_mb=128, boot_args=PROBE_BOOT_ARGS,
                           require_sandbox=True)
            vm = await start_firecracker(cfg)
            await vm.start_instance()
            vms.append(vm)
        print(json.dumps([vm.pid for vm in vms]), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def run_orchestrator(ids: list[str], crash_at: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", ORCHESTRATOR, ",".join(ids), crash_at],
        stdout=subprocess.PIPE,
        text=True,
    )


def gc_ids(state_dir: Path, ids: list[str]) -> GcReport:
    become_subreaper()
    report = collect_garbage(Registry(state_dir), vm_ids=ids, orphan_grace_s=0)
    assert report.ok, report.to_dict()
    return report


def kinds(found: list[str]) -> set[str]:
    """``{"process", "jail dir", "cgroup", ...}`` of :func:`leftovers` entries."""
    known = ("process", "jail dir", "cgroup", "netns", "registry record", "run dir", "socket")
    return {k for f in found for k in known if f.startswith(k + " ")}


def done(report: GcReport, vm_id: str) -> set[tuple[str, str]]:
    """``(kind, action)`` of what gc did for ``vm_id``."""
    return {(a.kind, a.action) for a in report.actions if a.vm_id == vm_id}


async def test_orchestrator_killed_during_start(
    vm_id: str, chroot_base: Path, state_dir: Path
) -> None:
    proc = run_orchestrator([vm_id], "jail")
    try:
        assert proc.wait(timeout=60) == -signal.SIGKILL
        record = Registry(state_dir).get(vm_id)
        assert record is not None and record.jail_dir is not None  # recorded before made
        assert Path(record.jail_dir).exists()
    finally:
        proc.kill()
        proc.wait()
        report = gc_ids(state_dir, [vm_id])
    assert {("jail_dir", "removed"), ("record", "removed")} <= done(report, vm_id), report
    assert leftovers(vm_id, state_dirs=[state_dir]) == []


async def test_orchestrator_killed_mid_jail_claim_never_blocks_the_id(
    vm_id: str, chroot_base: Path, state_dir: Path
) -> None:
    """SIGKILL while the jail is being made: the id is usable again at once (the jail was
    never in place), and gc removes the unfinished claim."""
    proc = run_orchestrator([vm_id], "claim")
    try:
        assert proc.wait(timeout=60) == -signal.SIGKILL
        claims = list(chroot_base.glob(f"*/.claim-{vm_id}-*"))
        assert len(claims) == 1 and (claims[0] / ".ironclaw").is_file()
        assert not list(chroot_base.glob(f"*/{vm_id}"))
        report = gc_ids(state_dir, [vm_id])  # the dead owner's record, run dir and the claim
        removed = {a.name for a in report.actions if a.action == "removed"}
        assert str(claims[0]) in removed, report
        assert ("record", "removed") in done(report, vm_id), report
        assert leftovers(vm_id, state_dirs=[state_dir]) == []
        vm = await start_firecracker(halt_config(vm_id))
        await vm.stop()
    finally:
        proc.kill()
        proc.wait()
        gc_ids(state_dir, [vm_id])


async def test_orchestrator_killed_while_vms_run(
    vm_id: str, chroot_base: Path, state_dir: Path
) -> None:
    ids = [f"{vm_id}-a", f"{vm_id}-b"]
    proc = run_orchestrator(ids, "never")
    try:
        assert proc.stdout is not None
        pids = json.loads(proc.stdout.readline())
        assert all(Path(f"/proc/{pid}").exists() for pid in pids)
        made = {i: kinds(leftovers(i, state_dirs=[state_dir])) for i in ids}
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # The VMMs outlive their orchestrator (that is the leak gc exists for).
        assert any(
            Path(f"/proc/{pid}/stat").exists()
            and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
            for pid in pids
        )
    finally:
        proc.kill()
        proc.wait()
        report = gc_ids(state_dir, ids)
    for vm_id_ in ids:
        want = {"process", "jail dir", "cgroup", "run dir", "registry record"}
        assert made[vm_id_] >= want, made
        assert {
            ("vmm", "killed"),
            ("cgroups", "removed"),
            ("jail_dir", "removed"),
            ("run_dir", "removed"),
            ("record", "removed"),
        } <= done(report, vm_id_), report
        assert leftovers(vm_id_, state_dirs=[state_dir], pids=pids) == []
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"
    assert Registry(state_dir).list() == []
