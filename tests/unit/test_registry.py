"""The crash-safe VM registry: claims, atomic writes, liveness, uid allocation, trust checks."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
import subprocess
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError, RegistryError
from ironclaw_orchestrator.registry import (
    Registry,
    default_state_dir,
    is_alive,
    read_process_start,
)
from ironclaw_orchestrator.registry import ids as ids_mod
from ironclaw_orchestrator.registry import store as store_mod


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def own_start() -> int:
    start = read_process_start(os.getpid())
    assert start is not None
    return start


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state")


# --------------------------------------------------------------------------- state dir


def test_state_dir_is_created_private(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "a" / "state")
    st = os.lstat(reg.state_dir)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()


def test_state_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IRONCLAW_STATE_DIR", str(tmp_path / "env-state"))
    assert default_state_dir() == tmp_path / "env-state"
    assert Registry().state_dir == tmp_path / "env-state"
    monkeypatch.delenv("IRONCLAW_STATE_DIR")
    assert default_state_dir() == Path("/run/ironclaw/registry")


def test_refuses_symlinked_state_dir(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(RegistryError, match="symlink"):
        Registry(tmp_path / "link")


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777])
def test_refuses_group_or_world_writable_state_dir(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "state"
    path.mkdir()
    os.chmod(path, mode)
    with pytest.raises(RegistryError, match="chmod 700"):
        Registry(path)


def test_refuses_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("x")
    with pytest.raises(RegistryError, match="not a directory"):
        Registry(tmp_path / "state")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_refuses_state_dir_owned_by_someone_else(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    os.chown(path, 12345, 12345)
    with pytest.raises(RegistryError, match="owned by uid 12345"):
        Registry(path)


def test_accepts_existing_private_dir(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o755)  # readable by others is fine, writable is not
    Registry(path)


# --------------------------------------------------------------------------- liveness


def test_is_alive_compares_pid_and_start_time() -> None:
    me = os.getpid()
    assert is_alive(me, own_start())
    assert not is_alive(me, own_start() + 1)  # a recycled pid has another start time
    assert not is_alive(me, None)
    assert not is_alive(None, own_start())
    assert not is_alive(dead_pid(), 1)


def test_zombie_counts_as_dead() -> None:
    proc = subprocess.Popen(["true"])
    try:
        # Wait until it has exited but is not reaped yet.
        for _ in range(500):
            text = Path(f"/proc/{proc.pid}/stat").read_text()
            if text[text.rfind(")") + 2] == "Z":
                break
            os.sched_yield()
        start = read_process_start(proc.pid)
        assert start is not None
        assert not is_alive(proc.pid, start)
    finally:
        proc.wait()


# --------------------------------------------------------------------------- claims


def test_claim_get_update_release(reg: Registry) -> None:
    rec = reg.claim("vm-1", memory_mb=256)
    assert rec.owner_pid == os.getpid() and rec.owner_start_time == own_start()
    assert rec.state == "starting" and rec.memory_mb == 256
    path = reg.record_path("vm-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["vm_id"] == "vm-1"
    assert reg.get("vm-1") == rec

    updated = reg.update("vm-1", state="running", vmm_pid=42, jail_dir=Path("/var/jail/x/vm-1"))
    assert updated.state == "running" and reg.get("vm-1") == updated
    assert reg.get("vm-1").memory_mb == 256  # type: ignore[union-attr]

    reg.release("vm-1")
    assert reg.get("vm-1") is None
    reg.release("vm-1")  # idempotent
    with pytest.raises(RegistryError, match="no record"):
        reg.update("vm-1", state="running")


def test_second_claim_of_live_id_fails_with_fix(reg: Registry) -> None:
    reg.claim("vm-1")
    with pytest.raises(RegistryError) as info:
        reg.claim("vm-1")
    msg = str(info.value)
    assert f"VM id vm-1 is in use (pid {os.getpid()} since " in msg
    assert "ironclaw vm stop vm-1" in msg


def test_stale_claim_is_not_taken_over(reg: Registry) -> None:
    pid = dead_pid()
    old = reg.claim("vm-1", owner_pid=pid, owner_start_time=1)
    with pytest.raises(RegistryError, match="ironclaw gc") as info:
        reg.claim("vm-1")
    assert f"pid {pid}" in str(info.value) and "gone" in str(info.value)
    assert reg.get("vm-1") == old


def test_invalid_ids_and_fields_are_rejected(reg: Registry) -> None:
    for bad in ("../x", "a/b", "", "x" * 65, ".hidden"):
        with pytest.raises(ConfigError):
            reg.claim(bad)
    reg.claim("vm-1")
    with pytest.raises(ConfigError, match="unknown registry field"):
        reg.update("vm-1", colour="red")
    with pytest.raises(ConfigError):
        reg.update("vm-1", state="exploded")


def test_crash_mid_write_keeps_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path / "state", durable=True)  # durable: every update is a new file
    rec = reg.claim("vm-1")
    # A crash after writing the temporary file, before the rename:
    torn = reg.state_dir / ".vm-1.json.abcdef.tmp"
    torn.write_text('{"vm_id": "vm-1", "state": "run')
    assert reg.get("vm-1") == rec
    assert [r.vm_id for r in reg.list()] == ["vm-1"]

    # A failing rename leaves the old record, and no temporary file of its own.
    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod, "replace_file", boom)
    with pytest.raises(RegistryError, match="No space left"):
        reg.update("vm-1", state="running")
    monkeypatch.undo()
    assert reg.get("vm-1") == rec
    assert sorted(p.name for p in reg.state_dir.iterdir()) == [".lock", torn.name, "vm-1.json"]


def test_a_failed_write_in_place_falls_back_to_a_new_file(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = reg.claim("vm-1")
    inode = reg.record_path("vm-1").stat().st_ino

    def boom(fd: int, data: bytes, offset: int) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pwrite", boom)
    running = reg.update("vm-1", state="running")
    assert reg.get("vm-1") == running and reg.record_path("vm-1").stat().st_ino != inode
    assert sorted(p.name for p in reg.state_dir.iterdir()) == [".lock", "vm-1.json"]

    def no_space(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod, "replace_file", no_space)
    with pytest.raises(RegistryError, match=r"cannot write its record .*No space left"):
        reg.update("vm-1", state="stopping")
    monkeypatch.undo()
    assert reg.get("vm-1") == running != rec
    assert sorted(p.name for p in reg.state_dir.iterdir()) == [".lock", "vm-1.json"]


def test_corrupt_records_are_skipped_and_reported(reg: Registry) -> None:
    reg.claim("good")
    (reg.state_dir / "bad.json").write_text("{not json")
    (reg.state_dir / "wrong.json").write_text(
        json.dumps({"vm_id": "other", "owner_pid": 1, "owner_start_time": 1})
    )
    (reg.state_dir / "notes.txt").write_text("ignored")
    assert [r.vm_id for r in reg.list()] == ["good"]
    scan = reg.scan()
    assert sorted(p.path.name for p in scan.problems) == ["bad.json", "wrong.json"]
    with pytest.raises(RegistryError, match="corrupt"):
        reg.get("bad")
    with pytest.raises(RegistryError, match="unreadable"):
        reg.claim("bad")
    moved = reg.quarantine(reg.state_dir / "bad.json")
    assert moved.exists() and reg.get("bad") is None
    reg.claim("bad")


def _claim_in_child(state_dir: str, vm_id: str, barrier: object, results: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    try:
        Registry(state_dir).claim(vm_id)
        results.put(("won", os.getpid()))  # type: ignore[attr-defined]
    except RegistryError as exc:
        results.put(("lost", str(exc)))  # type: ignore[attr-defined]


def test_concurrent_claims_never_both_win(reg: Registry) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 8
    for round_ in range(3):
        vm_id = f"race-{round_}"
        barrier = ctx.Barrier(n)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_claim_in_child, args=(str(reg.state_dir), vm_id, barrier, results))
            for _ in range(n)
        ]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=30) for _ in range(n)]
        for p in procs:
            p.join(30)
        winners = [o for o in outcomes if o[0] == "won"]
        assert len(winners) == 1, outcomes
        record = reg.get(vm_id)
        assert record is not None and record.owner_pid == winners[0][1]
        assert all(f"VM id {vm_id}" in o[1] for o in outcomes if o[0] == "lost")


# --------------------------------------------------------------------------- uid/gid


def test_allocate_ids_lowest_free_and_released_with_record(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ids_mod, "host_has_id", lambda n: n == 64_001)
    for vm_id in ("a", "b", "c"):
        reg.claim(vm_id)
    assert reg.allocate_ids("a") == (64_000, 64_000)
    assert reg.allocate_ids("b") == (64_002, 64_002)  # 64001 belongs to a host account
    assert reg.allocate_ids("b") == (64_002, 64_002)  # idempotent
    assert reg.get("b").uid == 64_002  # type: ignore[union-attr]
    reg.release("a")
    assert reg.allocate_ids("c") == (64_000, 64_000)
    with pytest.raises(RegistryError, match="claim the id"):
        reg.allocate_ids("nope")


def test_allocate_ids_exhausted(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids_mod, "host_has_id", lambda n: False)
    reg.claim("a")
    reg.claim("b")
    reg.allocate_ids("a", first=70_000, count=1)
    with pytest.raises(RegistryError, match="in use by other VMs"):
        reg.allocate_ids("b", first=70_000, count=1)


def test_allocation_counts_ids_of_every_record_file(
    reg: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ids are read from the raw JSON (no model validation); a record of another schema
    still holds its ids, and an unparsable one is reported."""
    monkeypatch.setattr(ids_mod, "host_has_id", lambda n: False)
    (reg.state_dir / "future.json").write_text('{"format": 99, "uid": 64000, "gid": 64001}')
    (reg.state_dir / "broken.json").write_text("{not json")
    reg.claim("a")
    with caplog.at_level("WARNING"):
        assert reg.allocate_ids("a") == (64_002, 64_002)
    assert "1 record(s) are unreadable" in caplog.text


def _allocate_in_child(state_dir: str, vm_id: str, barrier: object, results: object) -> None:
    reg = Registry(state_dir)
    reg.claim(vm_id)
    barrier.wait()  # type: ignore[attr-defined]
    results.put(reg.allocate_ids(vm_id, first=200_000, count=100))  # type: ignore[attr-defined]


def test_concurrent_allocators_get_unique_ids(reg: Registry) -> None:
    ctx = multiprocessing.get_context("fork")
    n = 10
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_allocate_in_child, args=(str(reg.state_dir), f"vm-{i}", barrier, results)
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in range(n)]
    for p in procs:
        p.join(30)
    uids = [uid for uid, _ in got]
    assert len(set(uids)) == n, got
    assert sorted(r.uid for r in reg.list()) == sorted(uids)  # type: ignore[type-var]


def test_claim_allocates_ids_in_its_one_write(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ids_mod, "host_has_id", lambda n: n == 64_000)
    writes: list[str] = []
    real_write = Registry._write_tmp

    def counting(self: Registry, vm_id: str, data: bytes) -> Path:
        writes.append(vm_id)
        return real_write(self, vm_id, data)

    monkeypatch.setattr(Registry, "_write_tmp", counting)
    a = reg.claim("a", allocate_ids=True)
    b = reg.claim("b", allocate_ids=True)
    assert (a.uid, a.gid, b.uid, b.gid) == (64_001, 64_001, 64_002, 64_002)
    assert reg.get("a") == a
    assert writes == ["a", "b"]  # one write per claim, ids included
    assert reg.allocate_ids("a") == (64_001, 64_001)  # already has them: no new write
    assert writes == ["a", "b"]
    with pytest.raises(RegistryError, match="in use"):
        reg.claim("a", allocate_ids=True)
    reg.release("a")
    assert reg.claim("c", allocate_ids=True).uid == 64_001  # freed with the record
