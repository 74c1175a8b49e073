"""The jailed launch path against the real jailer + firecracker with the probe guest."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from jailcheck import assert_jailed

from ironclaw_orchestrator.errors import (
    CgroupError,
    ChrootBaseError,
    JailerError,
    SandboxRequiredError,
    VmExitedError,
)
from ironclaw_orchestrator.vm import (
    FirecrackerProcess,
    JailerConfig,
    VmConfig,
    start_firecracker,
    start_with_jailer,
    stop_firecracker,
)
from ironclaw_orchestrator.vm import netns as ns
from ironclaw_orchestrator.vm.lifecycle import exited_error
from ironclaw_orchestrator.vm.probe import (
    PROBE_BOOT_ARGS,
    READY_LINE,
    ProbeBehaviour,
    probe_kernel_path,
)
from ironclaw_orchestrator.vm.process import ChildProcess

pytestmark = pytest.mark.integration


def probe_config(
    vm_id: str, behaviour: ProbeBehaviour = ProbeBehaviour.RESET, **kw: object
) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(behaviour)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        **kw,  # type: ignore[arg-type]
    )


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


async def test_jailed_vm_runs_as_jail_user_in_chroot_with_limits(
    vm_id: str, chroot_base: Path, exec_name: str
) -> None:
    vm = await start_firecracker(probe_config(vm_id, ProbeBehaviour.HALT, require_sandbox=True))
    try:
        assert_jailed(vm, chroot_base)  # uid/gid, chroot, PID/mount/net namespaces, cgroups
        jailer = vm.vmm
        status = proc_status(vm.pid)
        assert status["Name"] == exec_name[:15]  # the resolved exec file's name
        # Its own uid/gid from the registry (64000 and up; other VMs on this host hold some).
        uid = jailer.config.uid  # type: ignore[union-attr]
        assert uid >= 64000 and status["Uid"].split()[0] == status["Gid"].split()[0] == str(uid)
        # The jailer pivot_roots into the chroot: the VMM's / is the jail's root/ directory.
        root = os.stat(f"/proc/{vm.pid}/root/")
        chroot = os.stat(jailer.chroot_dir)  # type: ignore[union-attr]
        assert (root.st_dev, root.st_ino) == (chroot.st_dev, chroot.st_ino)
        assert os.path.exists(f"/proc/{vm.pid}/root/vmlinux")
        assert vm.socket_path == chroot_base / exec_name / vm_id / "root/run/firecracker.socket"
        assert vm.socket_path.is_socket()
        # Its memory cgroup (from /proc/<pid>/cgroup) holds the derived limit.
        lines = Path(f"/proc/{vm.pid}/cgroup").read_text().splitlines()
        mem_rel = next(line.split(":", 2)[2] for line in lines if line.split(":")[1] == "memory")
        assert mem_rel.endswith(f"/ironclaw/{vm_id}")
        limit = Path("/sys/fs/cgroup/memory", mem_rel.lstrip("/"), "memory.limit_in_bytes")
        assert int(limit.read_text()) == (128 + 64) << 20
        cpu_rel = next(line.split(":", 2)[2] for line in lines if line.split(":")[1] == "cpu")
        quota = Path("/sys/fs/cgroup/cpu", cpu_rel.lstrip("/"), "cpu.cfs_quota_us")
        assert int(quota.read_text()) == 100_000
        # Its own network namespace, holding only loopback.
        assert os.stat(f"/proc/{vm.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        assert vm.vmm.netns_path == f"/proc/{vm.pid}/ns/net"  # type: ignore[union-attr]
        assert await asyncio.to_thread(ns.interfaces_in, vm.vmm.netns_path) == ["lo"]  # type: ignore[union-attr]
        # Kernel staged inside the jail for the jail user.
        kernel = jailer.chroot_dir / "vmlinux"  # type: ignore[union-attr]
        assert kernel.is_file()
        # Boot: the guest prints its ready line on the console file.
        await vm.start_instance()
        await _wait_for_console(vm, READY_LINE)
    finally:
        await stop_firecracker(vm)
    assert not vm.socket_path.exists()
    assert vm.vmm.returncode is not None  # type: ignore[union-attr]


async def _wait_for_console(vm: FirecrackerProcess, text: str) -> None:
    for _ in range(2000):
        if text in vm.console_path.read_text(errors="replace"):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{text!r} never appeared; console:\n{vm.console_tail()}")


async def test_guest_reset_is_detected_as_clean_exit(vm_id: str, chroot_base: Path) -> None:
    vm = await start_firecracker(probe_config(vm_id))
    try:
        assert_jailed(vm, chroot_base)  # not the unjailed fallback: the jailer is here
        await vm.start_instance()
        assert await vm.wait() == 0
        assert READY_LINE in vm.console_path.read_text()
    finally:
        await vm.stop()
    await vm.stop()  # idempotent


async def test_stop_kills_guest_that_ignores_ctrl_alt_del(vm_id: str, chroot_base: Path) -> None:
    vm = await start_firecracker(probe_config(vm_id, ProbeBehaviour.HALT))
    try:
        assert_jailed(vm, chroot_base)  # SIGKILL of a jailed VMM, PID 1 of its namespace
        await vm.start_instance()
        await _wait_for_console(vm, READY_LINE)
    except BaseException:
        await vm.stop()
        raise
    pid = vm.pid
    code = await vm.stop(timeout_s=0.5)
    assert code == -9
    assert not Path(f"/proc/{pid}").exists()  # reaped, not a zombie


async def test_unjailed_fallback_warns(
    vm_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = probe_config(vm_id, jailer=JailerConfig(jailer_binary=tmp_path / "no-jailer"))
    with caplog.at_level(logging.WARNING):
        vm = await start_firecracker(cfg)
    try:
        assert not vm.is_sandboxed
        assert any("UNSANDBOXED" in r.message for r in caplog.records)
        run_dir = vm.socket_path.parent
        assert run_dir.stat().st_mode & 0o777 == 0o700
        await vm.start_instance()
        assert await vm.wait() == 0
        assert READY_LINE in vm.console_path.read_text()
    finally:
        await vm.stop()
    assert not run_dir.exists()


async def test_production_mode_refuses_fallback(
    vm_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IRONCLAW_REQUIRE_SANDBOX", "1")
    cfg = probe_config(vm_id, jailer=JailerConfig(jailer_binary=tmp_path / "no-jailer"))
    with pytest.raises(SandboxRequiredError) as info:
        await start_firecracker(cfg)
    assert "jailer binary not found" in str(info.value)
    assert "install" in str(info.value)


async def test_chroot_base_missing(vm_id: str, tmp_path: Path) -> None:
    cfg = JailerConfig(jailer_id=vm_id, chroot_base_dir=tmp_path / "missing")
    with pytest.raises(ChrootBaseError) as info:
        await start_with_jailer(cfg)
    assert str(tmp_path / "missing") in str(info.value) and "mkdir" in str(info.value)


async def test_cgroup_value_rejected_by_kernel(vm_id: str, chroot_base: Path) -> None:
    cfg = JailerConfig(jailer_id=vm_id, cpuset_cpus="999")
    with pytest.raises(CgroupError) as info:
        await start_with_jailer(cfg)
    assert "cpuset.cpus" in str(info.value) and "999" in str(info.value)


async def test_vm_exiting_immediately_reports_status_and_output(
    vm_id: str, chroot_base: Path
) -> None:
    with pytest.raises(VmExitedError) as info:
        await start_with_jailer(JailerConfig(jailer_id=vm_id), log_level="Bogus")
    error = info.value
    assert error.exit_code not in (None, 0) and error.vm_id == vm_id
    # firecracker's own complaint about its arguments is in the error, with the status.
    assert "Arguments parsing error" in error.output_tail, error.output_tail
    assert error.output_tail in str(error)
    assert str(error).startswith(f"VM {vm_id}: ") and f"status {error.exit_code}" in str(error)


async def test_real_jailer_v2_refusal_is_explained(
    vm_id: str, chroot_base: Path, tmp_path: Path, exec_name: str
) -> None:
    """This host has no controllers on its cgroup2 mount: the real jailer refuses v2."""
    import shutil

    jailer = shutil.which("jailer") or os.environ["IRONCLAW_JAILER"]
    firecracker = shutil.which("firecracker") or os.environ["IRONCLAW_FIRECRACKER"]
    if Path("/sys/fs/cgroup/unified/cgroup.controllers").exists() is False:
        pytest.skip("needs this host's hybrid layout (cgroup2 mounted at /sys/fs/cgroup/unified)")
    if "memory" in Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().split():
        pytest.skip("memory is available on cgroup v2 here")
    log = tmp_path / "out.log"
    argv = [
        jailer, "--id", vm_id, "--exec-file", firecracker, "--uid", "64000", "--gid", "64000",
        "--chroot-base-dir", str(chroot_base), "--cgroup-version", "2",
        "--cgroup", "memory.max=268435456", "--", "--api-sock", "/run/firecracker.socket",
    ]  # fmt: skip
    proc = ChildProcess.spawn(argv, stdout_path=log)
    code = await proc.wait()
    shutil.rmtree(chroot_base / exec_name / vm_id, ignore_errors=True)
    error = exited_error(vm_id, code, log, what="the jailer")
    assert isinstance(error, JailerError)
    assert error.reason is not None and "memory" in error.reason
    assert "cgroup_version=1" in str(error)
