"""uid/gid allocation reads no record unless another process changed ids (issue: per-VM
CPU): work counts of record reads, and the generation counter that keeps the copy exact."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from ironclaw_orchestrator.registry import LOCK_NAME, Registry, ids, store


@pytest.fixture(autouse=True)
def no_host_accounts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "host_has_id", lambda n: False)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths of the record files read for their ids."""
    seen: list[str] = []
    real = ids.read_ids

    def counting(path: str) -> ids.Ids:
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(ids, "read_ids", counting)
    return seen


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@contextlib.contextmanager
def other_process() -> Iterator[None]:
    """Registries made inside use lock files of their own, as another process's do (their
    own open file of the lock, their own copies), and close them at the end."""
    saved = store._locks.copy()
    store._locks.clear()
    try:
        yield
    finally:
        for lock in store._locks.values():
            lock.close()
        store._locks.clear()
        store._locks.update(saved)


def generation(state: Path) -> int:
    return int.from_bytes((state / LOCK_NAME).read_bytes()[:8].ljust(8, b"\0"), "little")


def live(state: Path, n: int) -> Registry:
    reg = Registry(state)
    for i in range(n):
        reg.claim(f"live-{i}", allocate_ids=True)
    return reg


def test_a_claim_after_our_own_reads_no_record(state: Path, reads: list[str]) -> None:
    reg = live(state, 8)
    assert len(reads) == 0  # an empty directory: nothing to read at the first claim
    reads.clear()
    for i in range(8, 12):
        assert reg.claim(f"live-{i}", allocate_ids=True).uid == 64_000 + i
    reg.update("live-3", state="running")  # ids unchanged: no bump
    reg.release("live-5")
    assert reg.claim("again", allocate_ids=True).uid == 64_005  # our release freed it
    assert reads == []
    assert generation(state) == 12 + 1 + 1  # claims with ids, and the release


def test_a_change_by_another_process_makes_us_rescan(state: Path, reads: list[str]) -> None:
    reg = live(state, 6)
    with other_process():
        assert Registry(state).claim("theirs", allocate_ids=True).uid == 64_006
        assert len(reads) == 6  # its first allocation reads every record
    reads.clear()
    assert reg.claim("ours", allocate_ids=True).uid == 64_007
    assert sorted(reads) == sorted([f"live-{i}.json" for i in range(6)] + ["theirs.json"])
    reads.clear()
    assert reg.claim("ours-2", allocate_ids=True).uid == 64_008
    assert reads == []  # up to date again


def test_changes_that_leave_ids_alone_make_nobody_rescan(state: Path, reads: list[str]) -> None:
    reg = live(state, 4)
    before = generation(state)
    with other_process():
        other = Registry(state)
        other.claim("no-ids")  # a record without ids
        other.update("live-1", state="running", netns_name="ic-x")
        other.release("no-ids")
        other.release("never-claimed")
    assert generation(state) == before
    reads.clear()
    assert reg.claim("next", allocate_ids=True).uid == 64_004
    assert reads == []


def test_ids_set_by_another_process_are_seen(state: Path, reads: list[str]) -> None:
    reg = live(state, 2)
    with other_process():
        other = Registry(state)
        other.claim("chosen")
        other.update("chosen", uid=64_002, gid=64_002)  # a caller's own ids
        other.claim("later")
        assert other.allocate_ids("later") == (64_003, 64_003)
    assert reg.claim("ours", allocate_ids=True).uid == 64_004


def _release_in_child(state: str, vm_id: str) -> None:
    Registry(state).release(vm_id)


def _fork(target: object, *args: object) -> int | None:
    proc = multiprocessing.get_context("fork").Process(target=target, args=args)
    proc.start()
    proc.join(30)
    return proc.exitcode


def test_a_release_by_another_process_frees_the_id(state: Path) -> None:
    reg = live(state, 4)
    assert _fork(_release_in_child, str(state), "live-1") == 0
    assert reg.claim("ours", allocate_ids=True).uid == 64_001


def _crash_claim_after_bump(state: str) -> None:
    Registry._write_record = lambda *a, **k: os._exit(3)  # type: ignore[method-assign]
    Registry(state).claim("crashed", allocate_ids=True)


def _crash_release_after_bump(state: str, vm_id: str) -> None:
    store.LockFile.forget = lambda *a: os._exit(3)  # type: ignore[method-assign]
    Registry(state).release(vm_id)


def test_a_crash_between_bump_and_change_stays_exact(state: Path, reads: list[str]) -> None:
    reg = live(state, 4)
    before = generation(state)
    assert _fork(_crash_claim_after_bump, str(state)) == 3
    assert generation(state) == before + 1 and not (state / "crashed.json").exists()
    reads.clear()
    assert reg.claim("a", allocate_ids=True).uid == 64_004  # the crashed claim took nothing
    assert len(reads) == 4  # a needless rescan, nothing worse
    assert _fork(_crash_release_after_bump, str(state), "live-2") == 3
    assert (state / "live-2.json").exists()
    assert reg.claim("b", allocate_ids=True).uid == 64_005  # live-2 still holds 64002


def test_a_failed_write_leaves_the_ids_unknown(
    state: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = live(state, 3)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(store, "write_tmp", full)
        with pytest.raises(OSError):
            reg.claim("x", allocate_ids=True)
    reads.clear()
    assert reg.claim("y", allocate_ids=True).uid == 64_003
    assert len(reads) == 3  # rescanned rather than trusting a guess


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"not a number at all\n"])
def test_a_lock_file_of_an_older_release_works(
    state: Path, reads: list[str], content: bytes
) -> None:
    state.mkdir(mode=0o700)
    (state / LOCK_NAME).write_bytes(content)  # older releases leave it empty
    reg = Registry(state)
    reg.claim("a", allocate_ids=True)
    start = int.from_bytes(content[:8].ljust(8, b"\0"), "little")
    assert generation(state) == start + 1
    assert (state / LOCK_NAME).read_bytes()[8:] == content[8:]
    with other_process():
        assert Registry(state).claim("b", allocate_ids=True).uid == 64_001
    assert reg.claim("c", allocate_ids=True).uid == 64_002


def test_a_replaced_lock_file_drops_the_copy(state: Path, reads: list[str]) -> None:
    reg = live(state, 3)
    os.unlink(state / LOCK_NAME)  # a new lock file counts from 0 again
    with other_process():
        Registry(state).claim("theirs", allocate_ids=True)  # generation 1, again
    reads.clear()
    assert reg.claim("ours", allocate_ids=True).uid == 64_004
    assert len(reads) == 4


def test_copies_stay_exact_through_mixed_changes(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random changes by two processes: whenever a copy carries the current generation it
    equals a full scan, and no two records ever share an id."""
    rng = random.Random(7)
    reg = Registry(state)
    locks = [store.LockFile(f"{state}/{LOCK_NAME}") for _ in range(2)]
    who = 0
    monkeypatch.setattr(store, "lock_file", lambda state_dir: locks[who])
    checked = 0
    for step in range(400):
        who = rng.randrange(2)
        names = sorted(p.name.removesuffix(".json") for p in state.glob("*.json"))
        op = rng.choice(["claim", "claim-ids", "update", "allocate", "release", "release"])
        vm_id = rng.choice(names) if names else None
        if op == "claim":
            reg.claim(f"vm-{step}")
        elif op == "claim-ids":
            reg.claim(f"vm-{step}", allocate_ids=True)
        elif op == "update" and vm_id:
            n = rng.choice([None, 65_000 + step])
            reg.update(vm_id, uid=n, gid=n)
        elif op == "allocate" and vm_id:
            reg.allocate_ids(vm_id)
        elif op == "release" and vm_id:
            reg.release(vm_id)
        truth = {k: v for k, v in ids.scan_ids(str(state)).items() if v != ()}
        with locks[0].hold():
            current = locks[0].generation()
        for lock in locks:
            if lock.used.generation == current:
                checked += 1
                assert lock.used.by_name == truth, step
                table = ids.UsedIds()
                table.load(truth)
                assert (lock.used.count, lock.used.problems) == (table.count, table.problems)
        uids = [v[0] for v in truth.values() if v]
        assert len(uids) == len(set(uids)), step
    assert checked > 200  # the copies were up to date most of the time, and compared
    for lock in locks:
        lock.close()
