"""Snapshots, restores into fresh jails, forks and the warm pool, with the real binaries.

The guest is the counting probe: it prints a counter kept in guest RAM, so a restore that
continues the sequence (instead of starting at zero) proves the memory and vCPU state came
back. Every test leaves nothing behind: the ``vm_id`` fixture checks processes, jails, run
directories, cgroups and records named after the test's id; pooled jails are checked here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from ironclaw_orchestrator.errors import ApiError, ConfigError, UsageError
from ironclaw_orchestrator.gc import collect_garbage
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import (
    FirecrackerProcess,
    JailerConfig,
    Snapshot,
    VmConfig,
    WarmPool,
    restore_snapshot,
    start_firecracker,
)
from ironclaw_orchestrator.vm import restore as restore_mod
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.probe import (
    PROBE_BOOT_ARGS,
    READY_LINE,
    ProbeBehaviour,
    parse_counts,
    probe_kernel_path,
)
from ironclaw_orchestrator.vm.process import become_subreaper
from ironclaw_orchestrator.vm.restore import CLONE_MEMORY
from ironclaw_orchestrator.vm.snapshot import copy_sparse, seal_snapshot

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers  # noqa: E402


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("IRONCLAW_STATE_DIR", str(path))
    return path


def probe_config(
    vm_id: str, tmp_path: Path, behaviour: ProbeBehaviour, *, track_dirty_pages: bool = False
) -> VmConfig:
    disk = tmp_path / "disk.img"
    if not disk.exists():
        disk.write_bytes(b"D" * 65536)
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(behaviour)),
        rootfs_path=str(disk),
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        require_sandbox=True,
        track_dirty_pages=track_dirty_pages,
        # The counting guest busy-waits its vCPU: with a quota of exactly one CPU it would
        # starve the VMM's own API thread (same cgroup), and pause requests would time out.
        jailer=JailerConfig(cpu_limit=2.0),
    )


async def counts_after(vm: FirecrackerProcess, n: int) -> list[int]:
    """The console's counter values once at least ``n`` were printed."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        counts = parse_counts(vm.console_path.read_text(errors="replace"))
        if len(counts) >= n:
            return counts
        assert vm.vmm.process.alive, vm.console_tail()
        assert time.monotonic() < deadline, vm.console_tail()
        await asyncio.sleep(0.02)


@pytest.fixture
async def running(
    vm_id: str, chroot_base: Path, state_dir: Path, tmp_path: Path
) -> AsyncIterator[list[FirecrackerProcess]]:
    """VMs a test started; all stopped (quickly: the probe ignores Ctrl-Alt-Del) after it."""
    vms: list[FirecrackerProcess] = []
    yield vms
    for vm in vms:
        await vm.stop(timeout_s=0.2)


async def start_counting(
    vm_id: str, tmp_path: Path, vms: list[FirecrackerProcess], *, track_dirty_pages: bool = False
) -> FirecrackerProcess:
    config = probe_config(
        vm_id, tmp_path, ProbeBehaviour.COUNT, track_dirty_pages=track_dirty_pages
    )
    vm = await start_firecracker(config)
    vms.append(vm)
    await vm.start_instance()
    await counts_after(vm, 5)
    return vm


async def start_halted(
    vm_id: str, tmp_path: Path, vms: list[FirecrackerProcess]
) -> FirecrackerProcess:
    """A probe that prints its ready line and halts (for tests that need no counter)."""
    vm = await start_firecracker(probe_config(vm_id, tmp_path, ProbeBehaviour.HALT))
    vms.append(vm)
    await vm.start_instance()
    deadline = time.monotonic() + DEADLINE_S
    while READY_LINE not in vm.console_path.read_text():
        assert time.monotonic() < deadline, vm.console_tail()
        await asyncio.sleep(0.02)
    return vm


def ns_inode(pid: int, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


async def test_restore_continues_the_count_in_a_fresh_jail(
    vm_id: str, tmp_path: Path, running: list[FirecrackerProcess], state_dir: Path
) -> None:
    src = await start_counting(vm_id, tmp_path, running)
    taken = await src.snapshot(tmp_path / "snap", resume=False)
    at_pause = parse_counts(src.console_path.read_text())[-1]
    assert (await src.api.describe())["state"] == "Paused"

    loaded = Snapshot.load(tmp_path / "snap")
    assert loaded.manifest == taken.manifest
    assert loaded.manifest.source_vm_id == vm_id and loaded.manifest.snapshot_type == "Full"
    clone = await restore_snapshot(loaded, f"{vm_id}-c")
    running.append(clone)
    await src.stop(timeout_s=0.2)  # the clone does not depend on the source
    counts = await counts_after(clone, 5)
    assert READY_LINE not in clone.console_path.read_text()  # not booted again
    assert at_pause <= counts[0] <= at_pause + 2, (at_pause, counts[:3])
    assert counts == list(range(counts[0], counts[0] + len(counts)))

    # Its own jail: another uid, chroot, netns, cgroups; memory shared read-only.
    assert clone.vmm.config.uid != src.vmm.config.uid
    assert os.stat(f"/proc/{clone.pid}").st_uid == clone.vmm.config.uid
    assert ns_inode(clone.pid, "net") != ns_inode(os.getpid(), "net")
    assert f"{vm_id}-c" in Path(f"/proc/{clone.pid}/cgroup").read_text()
    mem_in_jail = clone.vmm.jail_host_path(CLONE_MEMORY)
    assert mem_in_jail.stat().st_ino == loaded.memory_path.stat().st_ino  # hard link
    assert loaded.memory_path.stat().st_mode & 0o222 == 0
    disk_in_jail = clone.vmm.jail_host_path("/rootfs.ext4")
    assert disk_in_jail.stat().st_ino != (loaded.path / "rootfs.ext4").stat().st_ino
    assert disk_in_jail.stat().st_uid == clone.vmm.config.uid

    rec = Registry(state_dir).get(f"{vm_id}-c")
    assert rec is not None and rec.vmm_pid == clone.pid
    netns = clone.vmm.netns_path
    assert netns == f"/proc/{clone.pid}/ns/net"  # nameless: nothing under /run/netns
    await clone.stop(timeout_s=0.2)
    assert not Path(netns).exists() and clone.vmm.netns_path is None
    assert Registry(state_dir).get(f"{vm_id}-c") is None
    assert loaded.memory_path.stat().st_nlink == 1
    Snapshot.load(tmp_path / "snap")  # untouched by its clones


async def test_two_forks_count_on_independently(
    vm_id: str, tmp_path: Path, running: list[FirecrackerProcess]
) -> None:
    src = await start_counting(vm_id, tmp_path, running)
    snap = await src.snapshot(tmp_path / "snap")
    await src.stop(timeout_s=0.2)
    forks = await asyncio.gather(
        restore_snapshot(snap, f"{vm_id}-f1"), restore_snapshot(snap, f"{vm_id}-f2")
    )
    running.extend(forks)
    one, two = [await counts_after(f, 5) for f in forks]
    assert abs(one[0] - two[0]) <= 1  # both continue from the snapshot's count ...
    await forks[0].stop(timeout_s=0.2)  # ... and one going away does not stop the other
    more = await counts_after(forks[1], len(two) + 5)
    assert more == list(range(more[0], more[0] + len(more)))
    assert len({f.vmm.config.uid for f in forks}) == 2
    assert ns_inode(forks[0].pid if forks[0].vmm.process.alive else forks[1].pid, "net") != 0


def last_count(vm: FirecrackerProcess) -> int:
    return parse_counts(vm.console_path.read_text(errors="replace"))[-1]


async def test_diff_snapshots_restore_from_the_diff_point(
    vm_id: str, tmp_path: Path, running: list[FirecrackerProcess]
) -> None:
    """Full, then Diff (dirty pages merged onto the Full's memory): a restore of the Diff
    continues from the Diff's count, not the Full's; a clone restored with tracking takes a
    Diff of its own on top, which restores too."""
    src = await start_counting(vm_id, tmp_path, running, track_dirty_pages=True)
    full = await src.snapshot(tmp_path / "full")
    at_full = last_count(src)
    await counts_after(src, at_full + 20)  # the counter moves on past the Full
    moved = tmp_path / "moved"
    os.rename(full.path, moved)  # a base that is gone is refused before the VM is paused
    with pytest.raises(ConfigError, match="disappeared"):
        await src.snapshot(tmp_path / "diff", diff=True, resume=False)
    os.rename(moved, full.path)
    assert not (tmp_path / "diff").exists() and not src.paused
    diff = await src.snapshot(tmp_path / "diff", diff=True, resume=False)
    at_diff = last_count(src)
    await src.stop(timeout_s=0.2)
    assert at_diff >= at_full + 19

    mem_size = 128 << 20
    m = Snapshot.load(diff.path).manifest
    assert m.snapshot_type == "Diff" and m.files["memory"].size == mem_size
    assert m.base is not None and m.base.path == str(full.path)
    assert m.base.memory_sha256 == full.manifest.files["memory"].sha256
    assert m.dirty_bytes is not None and 0 < m.dirty_bytes < mem_size // 4, m.dirty_bytes
    assert m.files["memory"].sha256 != m.base.memory_sha256
    assert not (diff.path / "memory.layer").exists()

    clone = await restore_snapshot(Snapshot.load(diff.path), f"{vm_id}-d")
    running.append(clone)
    assert clone.config.track_dirty_pages  # as the snapshot's VM
    counts = await counts_after(clone, 5)
    assert at_diff <= counts[0] <= at_diff + 2, (at_full, at_diff, counts[:3])
    assert counts == list(range(counts[0], counts[0] + len(counts)))

    # The restored VM tracks dirty pages: a Diff on top of the Diff it came from.
    await counts_after(clone, len(counts) + 20)
    diff2 = await clone.snapshot(tmp_path / "diff2", diff=True, resume=False)
    at_diff2 = parse_counts(clone.console_path.read_text())[-1]
    await clone.stop(timeout_s=0.2)
    assert diff2.manifest.base is not None and diff2.manifest.base.path == str(diff.path)
    again = await restore_snapshot(Snapshot.load(diff2.path), f"{vm_id}-e")
    running.append(again)
    counts = await counts_after(again, 3)
    assert at_diff2 <= counts[0] <= at_diff2 + 2, (at_diff, at_diff2, counts[:3])
    await again.stop(timeout_s=0.2)
    assert not leftovers(f"{vm_id}-d") and not leftovers(f"{vm_id}-e")


async def test_restore_refuses_a_damaged_snapshot_before_starting(
    vm_id: str, tmp_path: Path, running: list[FirecrackerProcess], state_dir: Path
) -> None:
    src = await start_halted(vm_id, tmp_path, running)
    with pytest.raises(UsageError, match="needs an earlier snapshot"):
        await src.snapshot(tmp_path / "diff0", diff=True)
    snap = await src.snapshot(tmp_path / "snap")
    with pytest.raises(UsageError, match="track_dirty_pages = true"):
        await src.snapshot(tmp_path / "diff1", diff=True)
    assert not (tmp_path / "diff1").exists()
    assert not list(src.vmm.chroot_dir.glob("snapshot-*"))  # the work dir went too
    assert (await src.api.describe())["state"] == "Running"  # resumed after the refusal
    os.chmod(snap.state_path, 0o644)
    with open(snap.state_path, "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ConfigError, match="changed after it was verified"):
        await restore_snapshot(snap, f"{vm_id}-bad")
    with pytest.raises(ConfigError, match="altered"):
        await restore_snapshot(tmp_path / "snap", f"{vm_id}-bad")
    assert Registry(state_dir).get(f"{vm_id}-bad") is None
    assert not leftovers(f"{vm_id}-bad")


async def test_a_load_firecracker_refuses_leaves_nothing(
    vm_id: str, tmp_path: Path, running: list[FirecrackerProcess], state_dir: Path
) -> None:
    """A well-formed snapshot whose VM state Firecracker cannot load: the restore fails at
    ``PUT /snapshot/load`` (its record was written while the load ran), stops the VMM and
    drops the record; nothing is left."""
    src = await start_halted(vm_id, tmp_path, running)
    good = await src.snapshot(tmp_path / "snap")
    await src.stop(timeout_s=0.2)
    work = tmp_path / "work"
    work.mkdir()
    copy_sparse(good.memory_path, work / "memory")
    copy_sparse(good.rootfs_path, work / "rootfs.ext4")  # type: ignore[arg-type]
    (work / "vmstate").write_bytes(b"\xff" * good.state_path.stat().st_size)
    bad = seal_snapshot(
        work, tmp_path / "bad", config=good.config, version=good.version, diff=False,
        rootfs_jail=PurePosixPath(good.manifest.rootfs_jail_path or "/rootfs.ext4"),
    )  # fmt: skip
    with pytest.raises(ApiError, match="snapshot/load"):
        await restore_snapshot(bad, f"{vm_id}-bad")
    assert Registry(state_dir).get(f"{vm_id}-bad") is None
    assert not leftovers(f"{vm_id}-bad")
    assert bad.memory_path.stat().st_nlink == 1  # the clone's link went with its jail


async def test_work_per_restore(
    vm_id: str,
    tmp_path: Path,
    running: list[FirecrackerProcess],
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counted, never timed: per restore, the registry is written three times (claim, before
    the netns, running), the API is one connection, no directory is made for the snapshot's
    files, and the clone config is validated once per snapshot, not per clone."""
    src = await start_halted(vm_id, tmp_path, running)
    snap = await src.snapshot(tmp_path / "snap")
    await src.stop(timeout_s=0.2)
    writes: list[str] = []
    real_write = Registry._write_record

    def counting_write(self: Registry, ident: str, data: bytes, **kw: Any) -> bytes:
        writes.append(ident)
        return real_write(self, ident, data, **kw)

    connections: list[str] = []
    real_connect = FirecrackerApi._connect

    async def counting_connect(self: FirecrackerApi) -> object:
        link = await real_connect(self)
        connections.append(str(self.socket_path))
        return link

    validated: list[str] = []
    real_clone = restore_mod._clone_config

    def counting_clone(src: VmConfig, clone_id: str, jailer: object) -> VmConfig:
        validated.append(clone_id)
        return real_clone(src, clone_id, jailer)  # type: ignore[arg-type]

    monkeypatch.setattr(Registry, "_write_record", counting_write)
    monkeypatch.setattr(FirecrackerApi, "_connect", counting_connect)
    monkeypatch.setattr(restore_mod, "_clone_config", counting_clone)
    for n in (1, 2):
        clone_id = f"{vm_id}-w{n}"
        writes.clear()
        connections.clear()
        clone = await restore_snapshot(snap, clone_id)
        running.append(clone)
        assert writes == [clone_id] * 3, writes
        assert connections == [str(clone.socket_path)], connections
        root = clone.vmm.chroot_dir
        assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["dev", "run"]
        assert (root / CLONE_MEMORY.name).stat().st_ino == snap.memory_path.stat().st_ino
        await clone.stop(timeout_s=0.2)
    assert validated == [vm_id]  # the template, from the source's config, once


def pool_leftovers(state_dir: Path) -> list[str]:
    found = [r.vm_id for r in Registry(state_dir).list()]
    base = Path("/var/jail")
    for exec_dir in base.iterdir():
        if exec_dir.is_dir():
            found += [str(j) for j in exec_dir.iterdir() if j.name in found]
    return found


async def test_warm_pool_boots_and_restores(
    vm_id: str, tmp_path: Path, running: list[FirecrackerProcess], state_dir: Path
) -> None:
    template = probe_config(vm_id, tmp_path, ProbeBehaviour.HALT)
    async with WarmPool(template, size=2) as pool:
        pooled = {vm.vmm.vm_id: vm.pid for vm in pool._idle}
        assert len(pooled) == 2 and all(i.startswith("pool-") for i in pooled)
        victim = pool._idle[0]
        victim.vmm.process.kill()  # dies while waiting: must never be handed out
        await victim.vmm.process.wait()
        vm = await pool.claim(f"{vm_id}-a", jailer=JailerConfig(memory_limit_mb=300))
        running.append(vm)
        assert vm.vmm.process.alive and vm.pid != victim.pid
        assert (await vm.api.describe())["state"] == "Running"
        rec = Registry(state_dir).get(f"{vm_id}-a")
        assert rec is not None and rec.jail_dir == vm.vmm.jail_dir  # user id -> pooled jail
        assert Registry(state_dir).get(vm.vmm.vm_id) is None
        limit = vm.vmm.resources.cgroups.paths["memory"] / "memory.limit_in_bytes"  # type: ignore[union-attr]
        assert int(limit.read_text()) == 300 << 20  # applied at claim
        deadline = time.monotonic() + DEADLINE_S
        while READY_LINE not in vm.console_path.read_text():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await vm.stop(timeout_s=0.2)
    assert pool_leftovers(state_dir) == []

    src = await start_counting(f"{vm_id}-s", tmp_path, running)
    snap = await src.snapshot(tmp_path / "snap")
    await src.stop(timeout_s=0.2)
    async with WarmPool(template, size=1, snapshot=snap) as pool:
        clone = await pool.claim(f"{vm_id}-b")
        running.append(clone)
        counts = await counts_after(clone, 3)
        assert counts[0] > 0
        with pytest.raises(ConfigError, match="fixed by the pool's snapshot"):
            await pool.claim(f"{vm_id}-x", memory_mb=256)
        await clone.stop(timeout_s=0.2)
    assert pool_leftovers(state_dir) == []


ORCHESTRATOR = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from ironclaw_orchestrator.vm import VmConfig, Snapshot, restore_snapshot, start_firecracker
    from ironclaw_orchestrator.vm import api, jailer
    from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path

    vm_id, mode, snap_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    async def main():
        if mode == "snapshot":
            cfg = VmConfig(vm_id=vm_id, kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
                           rootfs_path=None, memory_mb=128, boot_args=PROBE_BOOT_ARGS,
                           require_sandbox=True)
            vm = await start_firecracker(cfg)
            await vm.start_instance()
            real = api.FirecrackerApi.create_snapshot
            async def crash(self, body, **kw):
                await real(self, body, **kw)
                os.kill(os.getpid(), signal.SIGKILL)  # files written, nothing sealed yet
            api.FirecrackerApi.create_snapshot = crash
            await vm.snapshot(snap_dir)
        else:
            real = api.FirecrackerApi.load_snapshot
            async def crash(self, body, **kw):
                await real(self, body, **kw)
                os.kill(os.getpid(), signal.SIGKILL)  # clone running, not yet recorded as such
            api.FirecrackerApi.load_snapshot = crash
            await restore_snapshot(Snapshot.load(snap_dir), vm_id)

    asyncio.run(main())
    """
)


def run_orchestrator(vm_id: str, mode: str, snap_dir: Path) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", ORCHESTRATOR, vm_id, mode, str(snap_dir)],
        timeout=120,
        capture_output=True,
        text=True,
    )
    if proc.returncode != -signal.SIGKILL:
        print(proc.stderr[-3000:])  # shown when the test fails
    return proc.returncode


def gc_ids(state_dir: Path, ids: list[str]) -> None:
    become_subreaper()
    report = collect_garbage(Registry(state_dir), vm_ids=ids, orphan_grace_s=0)
    assert report.ok, report.to_dict()


async def test_orchestrator_killed_during_snapshot_then_gc(
    vm_id: str, chroot_base: Path, state_dir: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "snap"
    try:
        assert run_orchestrator(vm_id, "snapshot", dest) == -signal.SIGKILL
        rec = Registry(state_dir).get(vm_id)
        assert rec is not None and rec.jail_dir is not None
        # The half-written snapshot is inside the dead VM's jail, never at dest.
        assert list(Path(rec.jail_dir, "root").glob("snapshot-*/memory"))
        assert not dest.exists()
        with pytest.raises(ConfigError):
            Snapshot.load(dest)
    finally:
        gc_ids(state_dir, [vm_id])
    assert not dest.exists() and list(tmp_path.iterdir()) == [state_dir]
    assert Registry(state_dir).list() == []


async def test_orchestrator_killed_during_restore_then_gc(
    vm_id: str, tmp_path: Path, running: list[FirecrackerProcess], state_dir: Path
) -> None:
    src = await start_halted(vm_id, tmp_path, running)
    snap = await src.snapshot(tmp_path / "snap")
    await src.stop(timeout_s=0.2)
    clone_id = f"{vm_id}-r"
    try:
        assert run_orchestrator(clone_id, "restore", snap.path) == -signal.SIGKILL
        rec = Registry(state_dir).get(clone_id)
        assert rec is not None and rec.jail_dir is not None  # recorded before it was made
        assert snap.memory_path.stat().st_nlink == 2  # linked into the orphaned clone
        pid_file = Path(rec.jail_dir, "root", f"{Path(rec.jail_dir).parent.name}.pid")
        vmm_pid = int(pid_file.read_text())
        assert Path(f"/proc/{vmm_pid}").exists()  # the clone outlived its orchestrator
    finally:
        gc_ids(state_dir, [clone_id])
    assert Registry(state_dir).get(clone_id) is None
    stat = Path(f"/proc/{vmm_pid}/stat")
    assert not stat.exists() or stat.read_text().split()[2] == "Z"
    assert snap.memory_path.stat().st_nlink == 1
    assert not leftovers(clone_id)
    Snapshot.load(snap.path)
