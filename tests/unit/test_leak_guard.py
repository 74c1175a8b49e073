"""The session guard (tests/conftest.py) errors a test that leaves a process, thread or file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

INNER = """
import os, subprocess, tempfile, threading

def test_clean(tmp_path):
    subprocess.run(["true"], check=True)
    (tmp_path / "f").write_text("pytest's tmp_path is not TMPDIR")

def test_orphan_of_a_killed_shell():
    # The shell forks sleep and is killed: sleep is orphaned (the stand-in leak we had).
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip()  # sleep is running
    proc.kill()
    proc.wait()
    proc.stdout.close()

def test_orphan_without_the_token():
    # The 'sleep 30' leak we had: the VMM launcher gives its child an empty environment
    # (no session token), the script's shell forks sleep and is killed: only ancestry (we
    # are a subreaper) finds the orphan.
    import signal, time
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", "sleep 60; :"], {}, setpgroup=0)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)

def test_thread():
    threading.Thread(target=threading.Event().wait, args=(30,), daemon=True).start()

def test_temp_file():
    fd, _ = tempfile.mkstemp()
    os.close(fd)
"""


MODULE_SCOPED = """
import subprocess
import pytest

@pytest.fixture(scope="module")
def pool():
    procs = []
    yield lambda: procs.append(subprocess.Popen(["sleep", "60"]))
    for p in procs[: KEEP]:
        p.kill()
        p.wait()

def test_starts_a_worker_the_module_fixture_owns(pool):
    pool()

def test_another(pool):
    pool()
"""


def test_processes_of_a_module_fixture_are_checked_when_it_ends(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IRONCLAW_TEST_LEAK_GRACE_S", "1")
    for name in ("conftest.py", "leakcheck.py"):
        shutil.copy(TESTS / name, pytester.path / name)
    pytester.makepyfile(
        test_owned=MODULE_SCOPED.replace("KEEP", "2"),  # the fixture stops both: fine
        test_forgotten=MODULE_SCOPED.replace("KEEP", "1"),  # it forgets one: an error
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=4, errors=1)
    out = result.stdout.str()
    assert "ERROR at teardown of test_another" in out
    assert "left things behind after its fixtures ended" in out and "sleep 60" in out
    assert "test_owned" not in out.split("short test summary")[-1]


def test_guard_names_each_leak_and_cleans_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IRONCLAW_TEST_LEAK_GRACE_S", "1")
    for name in ("conftest.py", "leakcheck.py"):
        shutil.copy(TESTS / name, pytester.path / name)
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:asyncio", timeout=120
    )
    result.assert_outcomes(passed=5, errors=4)
    out = result.stdout.str()
    assert "ERROR at teardown of test_orphan_of_a_killed_shell" in out
    assert "sleep 60" in out and "now killed" in out
    assert "ERROR at teardown of test_orphan_without_the_token" in out
    assert "ERROR at teardown of test_thread" in out and "threads still running" in out
    assert "ERROR at teardown of test_temp_file" in out and "files left in TMPDIR" in out
    assert "test_clean" not in out.split("short test summary")[-1]


SESSION_THREAD = """
import threading
import pytest

@pytest.fixture(scope="session")
def service():
    threading.Thread(target=threading.Event().wait, args=(30,), daemon=True).start()
    yield  # never stopped

def test_uses_a_session_service(service):
    pass
"""


def test_thread_outliving_the_session_fails_it(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IRONCLAW_TEST_LEAK_GRACE_S", "1")
    for name in ("conftest.py", "leakcheck.py"):
        shutil.copy(TESTS / name, pytester.path / name)
    pytester.makepyfile(test_session=SESSION_THREAD)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=1, errors=1)
    assert "threads still running at the end of the session" in result.stdout.str()
