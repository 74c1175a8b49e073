"""The registry's store: one lock file per process, records written in place, work counts.

Work counts, never timings, guard the per-VM cost (issue: per-VM CPU): how often the lock
file is opened, how many record writes and new files a VM's lifecycle costs.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator.errors import RegistryError
from ironclaw_orchestrator.registry import LOCK_NAME, RECORD_SIZE, Registry, store
from ironclaw_orchestrator.registry.record import pad_record


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state")


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """Calls of the record write, of new-file creation, and lock-file opens."""
    seen: dict[str, list[str]] = {"writes": [], "new_files": [], "lock_opens": []}
    real_write, real_tmp, real_open = (
        Registry._write_record,
        Registry._write_tmp,
        store.LockFile._open,
    )

    def write(self: Registry, vm_id: str, data: bytes, **kw: Any) -> bytes:
        seen["writes"].append(vm_id)
        return real_write(self, vm_id, data, **kw)

    def tmp(self: Registry, vm_id: str, data: bytes) -> str:
        seen["new_files"].append(vm_id)
        return real_tmp(self, vm_id, data)

    def lock_open(self: store.LockFile, *, create: bool) -> bool:
        seen["lock_opens"].append(self.path)
        return real_open(self, create=create)

    monkeypatch.setattr(Registry, "_write_record", write)
    monkeypatch.setattr(Registry, "_write_tmp", tmp)
    monkeypatch.setattr(store.LockFile, "_open", lock_open)
    yield seen


def lifecycle(state_dir: Path, vm_id: str) -> None:
    """What a VM start and stop asks of the registry (a new Registry each, as
    start_firecracker makes when given none)."""
    reg = Registry(state_dir)
    reg.claim(vm_id, allocate_ids=True, config={"vm_id": vm_id}, vcpus=1)
    reg.update(vm_id, run_dir=Path(f"/run/ironclaw/vms/{vm_id}"), netns_name=f"ic-{vm_id}")
    reg.update(vm_id, vmm_pid=os.getpid(), vmm_start_time=1, sandboxed=True)
    reg.release(vm_id)


# --------------------------------------------------------------------------- work counts


def test_lock_file_is_opened_once_per_process(tmp_path: Path, counts: dict[str, list[str]]) -> None:
    state = tmp_path / "state"
    for i in range(5):
        lifecycle(state, f"vm-{i}")
    Registry(state).get("vm-0")
    Registry(state).list()
    assert counts["lock_opens"] == [f"{state}/{LOCK_NAME}"]


def test_a_lifecycle_writes_three_times_into_one_new_file(
    reg: Registry, counts: dict[str, list[str]]
) -> None:
    lifecycle(reg.state_dir, "warm")  # the lock is opened once per process, not per VM
    counts["writes"].clear()
    counts["new_files"].clear()
    counts["lock_opens"].clear()
    lifecycle(reg.state_dir, "vm-1")
    assert counts == {"writes": ["vm-1"] * 3, "new_files": ["vm-1"], "lock_opens": []}
    assert sorted(os.listdir(reg.state_dir)) == [LOCK_NAME]


# --------------------------------------------------------------------------- writes in place


def test_updates_overwrite_the_record_in_place(reg: Registry) -> None:
    """One file per record, made at the claim and padded to a page: an update is a write
    into it (no new file, rename or unlink), and the file stays one line of JSON."""
    reg.claim("vm-1", config={"boot_args": "x" * 200})
    path = reg.record_path("vm-1")
    inode = path.stat().st_ino
    assert path.stat().st_size == RECORD_SIZE
    reg.update("vm-1", jail_dir=Path("/srv/jail/firecracker/vm-1"), netns_name="ic-vm-1")
    shorter = reg.update("vm-1", config=None, jail_dir=None)
    assert path.stat().st_ino == inode and path.stat().st_size == RECORD_SIZE
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1 and raw.endswith(b" \n")
    assert json.loads(raw)["netns_name"] == "ic-vm-1" and json.loads(raw)["config"] is None
    assert reg.get("vm-1") == shorter
    assert sorted(p.name for p in reg.state_dir.iterdir()) == [".lock", "vm-1.json"]


def test_a_record_larger_than_a_page_is_replaced_whole(reg: Registry) -> None:
    reg.claim("vm-1")
    path = reg.record_path("vm-1")
    inode = path.stat().st_ino
    big = reg.update("vm-1", config={"boot_args": "x" * RECORD_SIZE})
    assert path.stat().st_ino != inode and path.stat().st_size > RECORD_SIZE
    assert reg.get("vm-1") == big
    small = reg.update("vm-1", config=None)  # back under a page: a new, padded file
    assert path.stat().st_size == RECORD_SIZE and reg.get("vm-1") == small
    assert sorted(p.name for p in reg.state_dir.iterdir()) == [".lock", "vm-1.json"]


def test_an_update_sees_another_writers_change(reg: Registry) -> None:
    """The bytes this process wrote last stand for the record only while the file holds
    them: a change by another process (here: another registry of the directory after the
    process forgot) is read, not overwritten with stale fields."""
    reg.claim("vm-1")
    reg.update("vm-1", vcpus=1)
    path = reg.record_path("vm-1")
    data = json.loads(path.read_bytes())
    data["memory_mb"] = 512
    path.write_text(json.dumps(data) + "\n")  # another writer, another file size
    assert reg.update("vm-1", vcpus=2).memory_mb == 512
    assert reg.get("vm-1").memory_mb == 512  # type: ignore[union-attr]


def test_padding_keeps_one_json_line() -> None:
    assert pad_record(b'{"a":1}\n', 12) == b'{"a":1}    \n'
    assert pad_record(b'{"a":1}\n', 9) == b'{"a":1} \n'  # one byte short: one space
    assert pad_record(b'{"a":1}\n', 8) == b'{"a":1}\n'
    assert pad_record(b'{"a":1}\n', 3) == b'{"a":1}\n'  # longer than asked: unchanged
    padded = pad_record(b'{"a":1}\n')
    assert len(padded) == RECORD_SIZE and json.loads(padded) == {"a": 1}


# --------------------------------------------------------------------------- the lock


def test_a_removed_lock_file_is_reopened(reg: Registry, counts: dict[str, list[str]]) -> None:
    """Processes that open the lock afresh lock the new file: so must we, or two
    orchestrators would each hold "the" lock."""
    reg.claim("vm-1")
    os.unlink(reg.lock_path)
    reg.update("vm-1", vcpus=2)
    assert len(counts["lock_opens"]) == 2 and reg.lock_path.exists()
    held = os.stat(reg.lock_path).st_ino
    reg.update("vm-1", vcpus=3)
    assert len(counts["lock_opens"]) == 2 and os.stat(reg.lock_path).st_ino == held


def test_nested_holds_lock_once_and_shared_cannot_upgrade(reg: Registry) -> None:
    lock = store.lock_file(str(reg.state_dir))
    with reg.locked():
        assert reg.get("none") is None  # a shared hold inside an exclusive one
        with reg.locked():
            pass
    with lock.hold(exclusive=False), pytest.raises(RuntimeError, match="upgrade"), lock.hold():
        pass
    assert lock.idle()


def _claim_when_free(state_dir: str, started: Any, done: Any) -> None:
    started.set()
    Registry(state_dir).claim("child")
    done.set()


def test_a_forked_child_does_not_share_the_parents_lock(reg: Registry) -> None:
    """An flock belongs to the open file, which a fork shares: a child using the parent's
    open lock file would get "the lock" while the parent holds it."""
    ctx = multiprocessing.get_context("fork")
    started, done = ctx.Event(), ctx.Event()
    reg.claim("parent")  # the lock file is open in this process now
    with reg.locked():
        child = ctx.Process(target=_claim_when_free, args=(str(reg.state_dir), started, done))
        child.start()
        assert started.wait(30)
        assert not done.wait(0.5)  # blocked: the parent holds the lock
        assert reg.get("child") is None
    assert done.wait(30)
    child.join(30)
    assert child.exitcode == 0
    assert reg.get("child") is not None


def test_threads_of_one_process_exclude_each_other(reg: Registry) -> None:
    """They share the one open lock file, on which flock would not make them wait."""
    import threading

    inside: list[int] = []
    overlaps: list[int] = []

    def work(i: int) -> None:
        for _ in range(50):
            with reg.locked():
                inside.append(i)
                if len(inside) > 1:
                    overlaps.append(i)
                time.sleep(0)
                inside.remove(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not overlaps


def test_at_most_a_few_lock_files_stay_open(tmp_path: Path) -> None:
    regs = [Registry(tmp_path / f"s{i}") for i in range(store.MAX_OPEN_LOCKS + 4)]
    for r in regs:
        r.claim("vm-1")
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor
            fds.add(os.readlink(f"/proc/self/fd/{fd}"))
    open_locks = [r for r in regs if str(r.lock_path) in fds]
    assert len(open_locks) <= store.MAX_OPEN_LOCKS
    assert str(regs[-1].lock_path) in fds  # the most recent is kept


def test_reading_creates_no_lock_file(reg: Registry) -> None:
    assert reg.get("vm-1") is None and reg.list() == []
    assert os.listdir(reg.state_dir) == []


def test_an_unlocked_reader_rereads_under_the_lock_what_it_could_not_parse(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a lock file a reader goes unlocked; a record it cannot parse may have been
    mid-write (by a writer who made the lock file meanwhile), so it is read again, locked,
    before it counts as corrupt (which gc would move aside)."""
    rec = reg.claim("vm-1")
    os.unlink(reg.lock_path)
    store.lock_file(str(reg.state_dir)).close()  # as in a process that never wrote
    real_read = Registry._read
    torn: list[str] = []

    def read_torn_once(self: Registry, path: Path | str) -> object:
        if not torn:
            torn.append(str(path))
            raise RegistryError(f"VM record {path} is corrupt (torn)")
        return real_read(self, path)

    monkeypatch.setattr(Registry, "_read", read_torn_once)
    assert reg.get("vm-1") == rec and reg.lock_path.exists()
    os.unlink(reg.lock_path)
    store.lock_file(str(reg.state_dir)).close()
    torn.clear()
    scan = reg.scan()
    assert scan.records == [rec] and scan.problems == []
    (reg.state_dir / "bad.json").write_text("{not json")  # corrupt under the lock too
    assert [p.path.name for p in reg.scan().problems] == ["bad.json"]


def _update_forever(state_dir: str, ready: Any) -> None:
    reg = Registry(state_dir)
    ready.set()
    i = 0
    while True:  # records of alternating length: each write pads over a longer one
        i += 1
        reg.update("vm-1", config={"n": i, "pad": "x" * (i % 7) * 300})


def test_a_writer_killed_mid_update_leaves_a_whole_record(reg: Registry) -> None:
    """SIGKILL at any moment of updates in place: the record is the old or the new one, and
    readers in the meantime never see a torn one."""
    reg.claim("vm-1", config={"n": 0, "pad": ""})
    ctx = multiprocessing.get_context("fork")
    seen: list[int] = []
    for _ in range(5):
        ready = ctx.Event()
        writer = ctx.Process(target=_update_forever, args=(str(reg.state_dir), ready))
        writer.start()
        try:
            assert ready.wait(30)
            for _ in range(200):
                rec = reg.get("vm-1")  # raises if torn
                assert rec is not None and rec.config is not None
                seen.append(rec.config["n"])
        finally:
            os.kill(writer.pid, 9)  # type: ignore[arg-type]
            writer.join(30)
        rec = reg.get("vm-1")
        assert rec is not None and rec.config is not None
        assert rec.config["pad"] == "x" * (rec.config["n"] % 7) * 300
        assert os.path.getsize(reg.record_path("vm-1")) == RECORD_SIZE
    assert len(set(seen)) > 1  # the writers did write meanwhile


def test_a_child_forked_inside_a_hold_locks_for_real_afterwards(reg: Registry) -> None:
    """Leaving the inherited hold in the child must not unbalance its bookkeeping: its
    next hold takes the lock (through its own file) instead of passing as nested."""
    reg.claim("parent")
    lock = store.lock_file(str(reg.state_dir))
    with lock.hold():
        pid = os.fork()  # the child leaves this block too, then reports by exit code
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            with lock.hold() as held:
                code = 0 if held and lock._depth == 1 and lock._fd >= 0 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _lock_is_free(reg: Registry) -> bool:
    """Whether another open file of the registry lock could take it now."""
    import fcntl

    fd = os.open(reg.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_an_update_of_our_own_record_validates_and_encodes_outside_the_lock(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exclusive lock is held for the read and the write of an update, so the event
    loop's claims and the workers' updates wait for each other as little as they can."""
    import ironclaw_orchestrator.registry as registry_mod

    reg.claim("vm-1")
    held: list[tuple[str, bool]] = []
    real_make, real_encode = registry_mod.make_record, registry_mod.encode_record

    def make(*a: Any) -> Any:
        held.append(("make", not _lock_is_free(reg)))
        return real_make(*a)

    def encode(*a: Any) -> bytes:
        held.append(("encode", not _lock_is_free(reg)))
        return real_encode(*a)

    monkeypatch.setattr(registry_mod, "make_record", make)
    monkeypatch.setattr(registry_mod, "encode_record", encode)
    assert reg.update("vm-1", vcpus=2).vcpus == 2
    assert held == [("make", False), ("encode", False)]
    assert reg.get("vm-1").vcpus == 2  # type: ignore[union-attr]


def test_an_update_made_outside_the_lock_is_made_again_if_the_file_changed(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer between the unlocked preparation and the lock: its change is kept."""
    import ironclaw_orchestrator.registry as registry_mod

    reg.claim("vm-1")
    path = reg.record_path("vm-1")
    real_make = registry_mod.make_record
    calls: list[int] = []

    def make(*a: Any) -> Any:
        if not calls:  # the unlocked preparation: another process writes meanwhile
            data = json.loads(path.read_bytes())
            data["memory_mb"] = 512
            path.write_text(json.dumps(data) + "\n")
        calls.append(1)
        return real_make(*a)

    monkeypatch.setattr(registry_mod, "make_record", make)
    rec = reg.update("vm-1", vcpus=2)
    assert len(calls) == 2 and (rec.vcpus, rec.memory_mb) == (2, 512)
    assert reg.get("vm-1") == rec
