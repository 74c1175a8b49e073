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
