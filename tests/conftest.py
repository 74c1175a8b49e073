"""Session-wide guard: no process, thread or temp file may outlive the test that made it.

Every test runs with a private ``$TMPDIR`` for the session and a session token in the
environment (inherited by every process the test starts, see :mod:`leakcheck`). After each
test, processes it started that still run (after a grace period, for ones on their way out)
are killed and the test errors naming them; the same for threads it started that are still
alive and for files it left in ``$TMPDIR`` (removed). A test that uses a module- or
session-scoped fixture may start processes and threads that belong to it (a Ray worker of a
module's cluster, an agent the module restarts): what such a test leaves running is checked
when that fixture's scope ends instead. At the end of the session, anything still carrying
the token is killed and reported, and ``$TMPDIR`` must be empty.
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
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import leakcheck

from ironclaw_orchestrator.vm.netns.kernel import close_idle_workers
from ironclaw_orchestrator.vm.process import become_subreaper

pytest_plugins = ["pytester"]  # tests/unit/test_leak_guard.py runs pytest inside pytest

# Property-based tests (tests/unit/test_properties_*.py): a quick default for development;
# CI (.ci/run) selects "ci": more examples, no example database left in the clone. No
# deadline: tests assert behaviour, never timings (the machine is shared).
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("ci", max_examples=150, deadline=None, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

#: How long a process or thread started by a test may take to end after the test.
GRACE_S = float(os.environ.get("IRONCLAW_TEST_LEAK_GRACE_S", "10"))


_OURS = frozenset({"_leak_guard", "_leak_guard_module", "_leak_guard_session"})
_WIDER = {"class": "module", "module": "module", "package": "session", "session": "session"}


class Session:
    def __init__(self, token: str, tmpdir: Path, since: float) -> None:
        self.token = token
        self.tmpdir = tmpdir
        self.since = since
        #: Processes and threads left by tests, to be gone when a wider scope ends.
        self.deferred_procs: dict[str, set[leakcheck.ProcKey]] = {}
        self.deferred_threads: dict[str, set[threading.Thread]] = {}


def _owner_scope(item: pytest.Item) -> str:
    """``"module"`` / ``"session"`` if the test uses a fixture of the project's of that scope
    (other than ours), else ``"function"``: where what it leaves running may belong."""
    info = getattr(item, "_fixtureinfo", None)
    widest = "function"
    for name, defs in (getattr(info, "name2fixturedefs", None) or {}).items():
        if name in _OURS:
            continue
        for fixturedef in defs:
            if not getattr(fixturedef, "baseid", ""):
                continue  # pytest's and plugins' own (tmp_path_factory, ...): not owners
            wider = _WIDER.get(str(getattr(fixturedef, "scope", "function")))
            if wider == "session" or (wider == "module" and widest == "function"):
                widest = wider
    return widest


def _check(
    s: Session, started: set[leakcheck.ProcKey], since: float, threads: set[threading.Thread]
) -> list[str]:
    """Wait for ``started`` processes and ``threads`` to end; kill and name what does not."""
    problems = []
    alive = leakcheck.wait_gone(started, s.token, since, GRACE_S) if started else {}
    if alive:
        leakcheck.kill(set(alive))
        problems.append(f"processes still running (now killed): {sorted(alive.values())}")
    leakcheck.reap_zombies()
    still = leakcheck.join_threads(threads, GRACE_S)
    if still:
        problems.append(f"threads still running: {[t.name for t in still]}")
    return problems


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
    threads_at_start = set(threading.enumerate())
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
        # Deferred to the session, or started by a session fixture's setup: none may remain.
        late = session.deferred_threads.pop("session", set())
        late |= set(threading.enumerate()) - threads_at_start
        threads = leakcheck.join_threads(late, GRACE_S)
        files = sorted(leakcheck.tmp_entries(tmpdir))
        shutil.rmtree(tmpdir, ignore_errors=True)
    problems = []
    if left:
        problems.append(f"processes still running at the end of the session: {list(left.values())}")
    if files:
        problems.append(f"files left in the session's TMPDIR {tmpdir}: {files}")
    if threads:
        problems.append(f"threads still running at the end of the session: {threads}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _leak_guard_module(
    request: pytest.FixtureRequest, _leak_guard_session: Session
) -> Iterator[None]:
    """Checks what the module's tests left to its module-scoped fixtures, once those ended."""
    yield
    s = _leak_guard_session
    key = request.node.nodeid
    procs = s.deferred_procs.pop(key, set())
    threads = s.deferred_threads.pop(key, set())
    problems = _check(s, procs, s.since, threads)
    if problems:
        pytest.fail(
            "the module's tests left things behind after its fixtures ended: "
            + "; ".join(problems),
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _leak_guard(request: pytest.FixtureRequest, _leak_guard_session: Session) -> Iterator[None]:
    """Errors the test that leaves a process, a thread or a temp file behind."""
    s = _leak_guard_session
    since = leakcheck.seconds_since_boot() - 0.5  # start times have a clock-tick resolution
    threads_before = set(threading.enumerate())
    files_before = leakcheck.tmp_entries(s.tmpdir)
    yield
    close_idle_workers()  # the reused namespace helpers are the process's, not the test's
    started = set(leakcheck.our_processes(s.token, since))
    new_threads = set(threading.enumerate()) - threads_before
    scope = _owner_scope(request.node)
    problems = []
    if scope == "function":
        problems += _check(s, started, since, new_threads)
    else:  # may belong to a wider fixture: checked when its scope ends
        key = _module_key(request) if scope == "module" else "session"
        s.deferred_procs.setdefault(key, set()).update(started)
        s.deferred_threads.setdefault(key, set()).update(t for t in new_threads if t.is_alive())
        leakcheck.reap_zombies()
    files = sorted(leakcheck.tmp_entries(s.tmpdir) - files_before)
    if files:
        for name in files:
            path = s.tmpdir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        problems.append(f"files left in TMPDIR {s.tmpdir} (now removed): {files}")
    if problems:
        pytest.fail("the test left things behind: " + "; ".join(problems), pytrace=False)


def _module_key(request: pytest.FixtureRequest) -> str:
    module = request.node.getparent(pytest.Module)
    return module.nodeid if module is not None else "session"
