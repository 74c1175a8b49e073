"""uid/gid allocation: NSS "taken" answers are remembered briefly, never past an account
change; "free" answers never (the free id found is the one handed out)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ironclaw_orchestrator.registry import ids


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    asked: list[int] = []

    def nss(n: int) -> bool:
        asked.append(n)
        return n == 64_001

    passwd, group = tmp_path / "passwd", tmp_path / "group"
    passwd.write_text("root:x:0:0::/root:/bin/sh\n")
    group.write_text("root:x:0:\n")
    monkeypatch.setattr(ids, "_nss_has_id", nss)
    monkeypatch.setattr(ids, "_ACCOUNT_FILES", (str(passwd), str(group)))
    monkeypatch.setattr(ids, "_host_ids_key", ())
    return asked


def test_taken_answers_are_remembered_free_ones_never(lookups: list[int]) -> None:
    assert [ids.host_has_id(n) for n in (64_000, 64_001, 64_000, 64_001)] == [
        False,
        True,
        False,
        True,
    ]
    assert lookups == [64_000, 64_001, 64_000]


def test_an_account_that_takes_a_free_id_is_seen_at_once(
    monkeypatch: pytest.MonkeyPatch, lookups: list[int]
) -> None:
    """A VM's uid is released and an NSS source without account files (a systemd dynamic
    user, LDAP) takes it: the next allocation must not hand it out again."""
    assert not ids.host_has_id(64_000)
    monkeypatch.setattr(ids, "_nss_has_id", lambda n: n in (64_000, 64_001))
    assert ids.host_has_id(64_000)


def test_an_account_file_change_forgets_them(lookups: list[int], tmp_path: Path) -> None:
    assert ids.host_has_id(64_001)
    assert ids.host_has_id(64_001)
    assert lookups == [64_001]
    with open(tmp_path / "group", "a") as f:
        f.write("vm:x:64000:\n")
    assert ids.host_has_id(64_001)
    assert lookups == [64_001, 64_001]
    os.unlink(tmp_path / "passwd")
    assert ids.host_has_id(64_001)
    assert lookups == [64_001] * 3


def test_answers_expire(lookups: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    ids.host_has_id(64_001)
    ids.host_has_id(64_001)
    now[0] += ids.HOST_ID_TTL_S
    ids.host_has_id(64_001)
    assert lookups == [64_001, 64_001]


def test_nss_knows_root_and_not_a_free_id() -> None:
    assert ids._nss_has_id(0)
    assert not ids._nss_has_id(4_000_000_000)


def _lock_is_free(state: Path) -> bool:
    """Whether another open file of the registry lock could take it now."""
    import fcntl

    fd = os.open(state / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_a_claim_looks_up_its_id_once_and_not_under_the_lock(
    lookups: list[int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The one NSS lookup per handed-out id is made before the exclusive lock is taken
    (the lock does not order host accounts), so workers' updates do not wait for it."""
    from ironclaw_orchestrator.registry import Registry

    state = tmp_path / "state"
    reg = Registry(state)
    reg.claim("first")  # makes the lock file
    held: list[bool] = []
    real = ids._nss_has_id

    def nss(n: int) -> bool:
        held.append(not _lock_is_free(state))
        return real(n)  # the fixture's: 64_001 is taken

    monkeypatch.setattr(ids, "_nss_has_id", nss)
    lookups.clear()
    assert reg.claim("vm-a", allocate_ids=True).uid == 64_000
    assert reg.claim("vm-b", allocate_ids=True).uid == 64_002  # 64_001 an account's
    assert lookups == [64_000, 64_001, 64_002]
    assert held == [False, False, False]
    reg.release("vm-a")
    lookups.clear()
    assert reg.allocate_ids("first") == (64_000, 64_000)  # freed: looked up afresh
    assert lookups == [64_000] and held[-1] is False


def test_a_vetted_id_taken_meanwhile_is_passed_over_and_the_next_looked_up(
    lookups: list[int], tmp_path: Path
) -> None:
    from ironclaw_orchestrator.registry import Registry, store

    reg = Registry(tmp_path / "state")
    reg.claim("vm-a", allocate_ids=True)
    lock = store.lock_file(reg._dir)
    lock.used.drop()  # stale copy: the hint misses vm-a's id
    vetted = ids.vet_candidate(lock)
    assert vetted == 64_000
    lookups.clear()
    with lock.hold():
        n = ids.free_id(reg._dir, "vm-b", lock=lock, vetted=vetted)
    assert n == 64_002 and lookups == [64_001, 64_002]  # under the lock, as before
