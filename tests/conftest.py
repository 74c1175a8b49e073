"""Session-wide guard: no process, thread or temp file may outlive the test that made it.

Every test runs with a private ``$TMPDIR`` for the session and a session token in the
environment (inherited by every process the test starts, see :mod:`leakcheck`). After each
test, processes it started that still run (after a grace period, for ones on their way out)
are killed and the test errors naming them; the same for threads it started that are still
alive and for files it left in ``$TMPDIR`` (removed). At the end of the session, anything
still carrying the token is killed and reported, and ``$TMPDIR`` must be empty.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import leakcheck

from ironclaw_orchestrator.vm.process import become_subreaper

pytest_plugins = ["pytester"]  # tests/unit/test_leak_guard.py runs pytest inside pytest

#: How long a process or thread started by a test may take to end after the test.
GRACE_S = float(os.environ.get("IRONCLAW_TEST_LEAK_GRACE_S", "10"))


class Session:
    def __init__(self, token: str, tmpdir: Path, since: float) -> None:
        self.token = token
        self.tmpdir = tmpdir
        self.since = since


@pytest.fixture(scope="session", autouse=True)
def _leak_guard_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    tmp_path_factory.getbasetemp()  # pytest's own tmp_path base stays where it is
    become_subreaper()  # orphans of our children become ours, so they are found
    token = secrets.token_hex(8)
    tmpdir = Path(tempfile.mkdtemp(prefix="ironclaw-tests-"))
    saved = {k: os.environ.get(k) for k in (leakcheck.TOKEN_ENV, "TMPDIR")}
    saved_tempdir = tempfile.tempdir
    os.environ[leakcheck.TOKEN_ENV] = token
    os.environ["TMPDIR"] = str(tmpdir)
    tempfile.tempdir = str(tmpdir)
    session = Session(token, tmpdir, leakcheck.seconds_since_boot() - 1)
    try:
        yield session
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = saved_tempdir
        left = leakcheck.our_processes(token, session.since)
        leakcheck.kill(set(left))
        leakcheck.reap_zombies()
        files = sorted(leakcheck.tmp_entries(tmpdir))
        shutil.rmtree(tmpdir, ignore_errors=True)
    problems = []
    if left:
        problems.append(f"processes still running at the end of the session: {list(left.values())}")
    if files:
        problems.append(f"files left in the session's TMPDIR {tmpdir}: {files}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture(autouse=True)
def _leak_guard(_leak_guard_session: Session) -> Iterator[None]:
    """Errors the test that leaves a process, a thread or a temp file behind."""
    s = _leak_guard_session
    since = leakcheck.seconds_since_boot() - 0.5  # start times have a clock-tick resolution
    threads_before = set(threading.enumerate())
    files_before = leakcheck.tmp_entries(s.tmpdir)
    yield
    problems = []
    started = set(leakcheck.our_processes(s.token, since))
    alive = leakcheck.wait_gone(started, s.token, since, GRACE_S) if started else {}
    if alive:
        leakcheck.kill(set(alive))
        problems.append(f"processes still running (now killed): {sorted(alive.values())}")
    leakcheck.reap_zombies()
    threads = leakcheck.new_threads(threads_before, GRACE_S)
    if threads:
        problems.append(f"threads still running: {[t.name for t in threads]}")
    files = sorted(leakcheck.tmp_entries(s.tmpdir) - files_before)
    if files:
        for name in files:
            path = s.tmpdir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        problems.append(f"files left in TMPDIR {s.tmpdir} (now removed): {files}")
    if problems:
        pytest.fail("the test left things behind: " + "; ".join(problems), pytrace=False)
