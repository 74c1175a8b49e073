"""start_with_jailer against the stand-in jailer: the real layout, stop, and every rollback.

Each failure is injected at one step; the test then asserts that exactly what the start made
is gone (the host looks as before) and that a neighbour VM's jail, run dir and cgroups,
planted first, survived. Runs anywhere, as any user (see ``standin_host.py``).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from standin_host import StandinHost, make_host

from ironclaw_orchestrator.errors import (
    ApiSocketTimeoutError,
    CgroupError,
    JailerError,
    StagingError,
    VmExitedError,
)
from ironclaw_orchestrator.vm import cleanup, jailer
from ironclaw_orchestrator.vm.jailer import JailFile, start_with_jailer


@pytest.fixture(params=[1, 2], ids=["cgroup-v1", "cgroup-v2"])
def host(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    yield from make_host(monkeypatch, request.param)


def files(host: StandinHost) -> list[JailFile]:
    return [
        JailFile(host.images / "vmlinux", PurePosixPath("/vmlinux")),
        JailFile(host.images / "rootfs.ext4", PurePosixPath("/rootfs.ext4"), False, True),
    ]


def pids_in(path: Path) -> list[int]:
    return [int(p) for p in (path / "cgroup.procs").read_text().split()]


async def test_start_makes_the_real_layout_and_stop_removes_exactly_it(host: StandinHost) -> None:
    neighbour = host.plant_neighbour()
    before = host.snapshot()
    cfg = host.jailer_config(pids_max=64)
    vmm = await start_with_jailer(cfg, files=files(host), ready_timeout_s=30)
    try:
        jail = host.jail()
        assert vmm.jail_dir == jail  # named after the *resolved* exec file
        assert (jail / cleanup.names.JAIL_MARKER).is_file()
        root = jail / "root"
        assert vmm.chroot_dir == root
        assert int((root / f"{host.exec_name}.pid").read_text()) == vmm.pid
        assert vmm.api_socket == root / "run" / "firecracker.socket"
        assert vmm.api_socket.is_socket()
        assert (root / "vmlinux").read_bytes() == (host.images / "vmlinux").read_bytes()
        assert (root / "rootfs.ext4").stat().st_uid == cfg.uid
        assert cleanup.jail_processes(jail) == [vmm.pid]  # its cwd is the jail's root
        cg_dirs = host.cgroup_dirs()
        assert cg_dirs and all(vmm.pid in pids_in(d) for d in cg_dirs)
        limit = "pids.max"
        assert any(
            (d / limit).exists() and (d / limit).read_text().strip() == "64" for d in cg_dirs
        )
        assert (await vmm.api.describe())["id"] == "sa-1"
    finally:
        await vmm.stop()
    assert vmm.process.returncode is not None
    assert host.snapshot() == before
    assert all(p.exists() for p in neighbour)
    await vmm.stop()  # idempotent


async def test_a_symlink_re_pointed_during_a_start_cannot_split_the_jail(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade re-points ``firecracker`` after the jail was named: the jailer is handed
    the resolved file, so it builds the jail we claimed and staged into (it resolves
    ``--exec-file`` itself: given the symlink, it would build another jail, unmarked)."""
    before = host.snapshot()
    newer = host.bin / "firecracker-v1.14.1"
    shutil.copy2(host.bin / host.exec_name, newer)
    real_claim = cleanup.claim_jail_dir

    def claim_then_upgrade(jail: Path, vm_id: str) -> Path:
        made = real_claim(jail, vm_id)
        tmp = host.bin / "firecracker.new"
        tmp.symlink_to(newer.name)
        os.replace(tmp, host.bin / "firecracker")
        return made

    monkeypatch.setattr(cleanup, "claim_jail_dir", claim_then_upgrade)
    vmm = await start_with_jailer(host.jailer_config(), files=files(host), ready_timeout_s=30)
    try:
        exec_file = Path(vmm.argv[vmm.argv.index("--exec-file") + 1])
        assert exec_file == host.bin / host.exec_name
        assert vmm.jail_dir == host.jail()
        assert not (host.base / newer.name).exists()
    finally:
        await vmm.stop()
    newer.unlink()
    (host.bin / "firecracker").unlink()
    (host.bin / "firecracker").symlink_to(host.exec_name)
    assert host.snapshot() == before


async def test_without_new_pid_ns_the_jailer_becomes_the_vmm(host: StandinHost) -> None:
    before = host.snapshot()
    vmm = await start_with_jailer(
        host.jailer_config(new_pid_ns=False), files=files(host), ready_timeout_s=30
    )
    try:
        assert "--new-pid-ns" not in vmm.argv
        assert not (host.jail() / "root" / f"{host.exec_name}.pid").exists()  # v1.0
        assert cleanup.jail_processes(host.jail()) == [vmm.pid]
    finally:
        await vmm.stop()
    assert host.snapshot() == before


@pytest.mark.parametrize(
    ("fail", "error", "words"),
    [
        ("before-chroot", JailerError, "Failed to canonicalize"),
        ("exit-after-pidfile", JailerError, "injected by standin.json"),
        ("no-pidfile", JailerError, "pid file"),
        ("exit-before-socket", VmExitedError, "failed before its socket"),
    ],
)
async def test_failed_start_removes_what_it_made(
    host: StandinHost, fail: str, error: type[Exception], words: str
) -> None:
    neighbour = host.plant_neighbour()
    before = host.snapshot()
    host.control(fail=fail)
    with pytest.raises(error, match=words):
        await start_with_jailer(host.jailer_config(), files=files(host), ready_timeout_s=30)
    assert host.snapshot() == before
    assert all(p.exists() for p in neighbour)


async def test_missing_pid_file_kills_the_vmm_found_by_its_root(host: StandinHost) -> None:
    host.control(fail="no-pidfile")
    with pytest.raises(JailerError) as info:
        await start_with_jailer(host.jailer_config(), files=files(host), ready_timeout_s=30)
    msg = str(info.value)
    assert f"{host.exec_name}.pid is missing" in msg and "killed its VMM (pid" in msg
    assert not host.jail().exists()


async def test_socket_never_made_times_out_and_rolls_back(host: StandinHost) -> None:
    before = host.snapshot()
    host.control(fail="hang-before-socket")
    with pytest.raises(ApiSocketTimeoutError, match="never created"):
        await start_with_jailer(host.jailer_config(), files=files(host), ready_timeout_s=1)
    assert host.snapshot() == before


async def test_staging_failure_rolls_back(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    neighbour = host.plant_neighbour()
    before = host.snapshot()
    real = jailer.stage_file
    staged: list[Path] = []

    def second_fails(src: Path, chroot: Path, jail_path: PurePosixPath, **kw: object) -> object:
        if staged:
            raise StagingError(f"cannot copy {src}: injected")
        staged.append(chroot / str(jail_path).lstrip("/"))
        return real(src, chroot, jail_path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(jailer, "stage_file", second_fails)
    with pytest.raises(StagingError, match="injected"):
        await start_with_jailer(host.jailer_config(), files=files(host), ready_timeout_s=30)
    assert staged and not staged[0].exists()
    assert host.snapshot() == before
    assert all(p.exists() for p in neighbour)


async def test_cgroup_value_refused_rolls_back(host: StandinHost) -> None:
    neighbour = host.plant_neighbour()
    before = host.snapshot()
    assert host.fs is not None
    host.fs.fail[("pids.max", None)] = errno.EINVAL
    with pytest.raises(CgroupError, match=r"pids\.max"):
        await start_with_jailer(host.jailer_config(pids_max=64), files=files(host))
    assert host.snapshot() == before
    assert all(p.exists() for p in neighbour)


async def test_attach_failure_after_spawn_kills_and_rolls_back(host: StandinHost) -> None:
    if host.version == 2:
        pytest.skip("cgroup v2: the jailer attaches the VMM itself, nothing is left to attach")
    before = host.snapshot()
    assert host.fs is not None
    host.fs.fail[("cgroup.procs", None)] = errno.ESRCH
    with pytest.raises(CgroupError, match="the process has exited"):
        await start_with_jailer(host.jailer_config(), files=files(host), ready_timeout_s=30)
    assert host.snapshot() == before


async def test_existing_jail_is_refused_and_kept(host: StandinHost) -> None:
    taken = host.jail()
    (taken / "root").mkdir(parents=True)
    before = host.snapshot()
    with pytest.raises(Exception, match="already exists"):
        await start_with_jailer(host.jailer_config(), files=files(host))
    assert host.snapshot() == before and taken.is_dir()


async def test_vmm_crash_after_start_is_reported_and_stop_cleans(host: StandinHost) -> None:
    before = host.snapshot()
    vmm = await start_with_jailer(host.jailer_config(), files=files(host), ready_timeout_s=30)
    os.kill(vmm.pid, 9)
    assert await vmm.wait() == -9
    await vmm.stop()
    assert host.snapshot() == before


async def test_every_limit_lands_in_a_file_the_kernel_has(host: StandinHost) -> None:
    """The jailer writes its --cgroup values without creating files: each must exist in
    the cgroups we prepared (controller enabled, right hierarchy)."""
    before = host.snapshot()
    cfg = host.jailer_config(
        pids_max=64, cpuset_cpus="0", cpu_weight=50, memory_high_mb=200, cpu_limit=0.5,
        io_read_bps=1000,
    )  # fmt: skip
    vmm = await start_with_jailer(cfg, files=files(host), ready_timeout_s=30)
    try:
        written = {a.split("=", 1)[0] for a in vmm.argv if "=" in a and "." in a.split("=")[0]}
        assert {"pids.max", "cpuset.cpus"} <= written
        for d in host.cgroup_dirs():
            assert vmm.pid in pids_in(d)
    finally:
        await vmm.stop()
    assert host.snapshot() == before
