"""Ctrl-C at any moment of ``ironclaw vm run`` / ``vm start`` start-up leaves nothing.

The CLI runs as a subprocess (the real binaries, the probe guest) and gets SIGINT after a
sweep of delays from 0 to a little past the time an uninterrupted command needs, measured
first on this machine: so the sweep covers the interpreter's start and imports, the
configuration, the supervisor's start (``vm start``) and the VM's start-up. After each
sweep: nothing of its VMs on the host, nothing in the private state directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ironclaw_orchestrator.vm.process import become_subreaper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "ironclaw_orchestrator.cli"]
#: Points per sweep; each costs about one command's run time (a few seconds on a busy host).
RUN_POINTS, START_POINTS = 20, 13
#: SIGINT means "stop and clean up" (130), or Python's own death by SIGINT while it is
#: still importing (before any command code runs, so before anything is made).
INTERRUPTED = (130, -signal.SIGINT)


def interrupted(done: subprocess.CompletedProcess[str]) -> bool:
    """Exited as a Ctrl-C should: 130, killed by SIGINT, or (a signal that lands while
    Python itself starts, before any of our code runs) Python's own exit 1: a fatal error
    importing ``site``, or ``-m`` failing to import ``runpy``."""
    python_start_up = done.returncode == 1 and (
        "Fatal Python error: init_import_site" in done.stderr
        or (
            done.stderr.startswith("Could not import runpy module")
            and done.stderr.rstrip().endswith("KeyboardInterrupt")
        )
    )
    return done.returncode in INTERRUPTED or python_start_up


@pytest.fixture
def env(real_host: None, tmp_path: Path) -> dict[str, str]:
    become_subreaper()
    Path("/var/jail").mkdir(mode=0o755, exist_ok=True)
    return {**os.environ, "IRONCLAW_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}


@pytest.fixture
def prefix(env: dict[str, str]) -> Iterator[str]:
    pre = f"cx-{uuid.uuid4().hex[:6]}-"
    yield pre
    left = leftovers(pre)
    assert not left, f"test left VM resources behind: {left}"


def timed(argv: list[str], env: dict[str, str]) -> float:
    began = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return time.monotonic() - began


def sweep(argv: list[str], env: dict[str, str], points: int) -> list[float]:
    """``points`` delays from 0 to the time ``argv`` takes uninterrupted on this machine now
    (measured, as a busy host may be several times slower than a quiet one)."""
    imports = timed([*CLI, *argv[len(CLI) :][:2], "--help"], env)  # import, parse, no work
    span = max(timed(argv, env), imports) * 1.05
    return [span * i / points for i in range(points)]


def _sigint_default() -> None:
    # A run started in the background by a shell without job control inherits SIGINT
    # ignored (POSIX), and the CLI rightly keeps it so: the child is a foreground command.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_at(
    argv: list[str], env: dict[str, str], delay: float
) -> subprocess.CompletedProcess[str]:
    pipe = subprocess.PIPE
    proc = subprocess.Popen(
        argv, env=env, stdout=pipe, stderr=pipe, text=True, preexec_fn=_sigint_default
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{argv} still ran 60 s after SIGINT at {delay:.3f} s:\n{err}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def state_files(env: dict[str, str]) -> list[str]:
    state = Path(env["IRONCLAW_STATE_DIR"])
    if not state.is_dir():
        return []
    # Supervisor logs (<id>.log) are kept for `vm logs --supervisor`; the lock is the dir's.
    return sorted(p.name for p in state.iterdir() if p.suffix != ".log" and p.name != ".lock")


def test_ctrl_c_during_vm_run_start_up_leaves_nothing(prefix: str, env: dict[str, str]) -> None:
    # The reset probe ends by itself once booted: a signal after that point finds the VM
    # gone (exit 0), one before it must stop and remove it (a halted guest would cost a
    # 3 s graceful stop per point instead).
    base = [*CLI, "vm", "run", "--probe", "reset", "--id"]
    results = []
    delays = sweep([*base, f"{prefix}t"], env, RUN_POINTS)
    for i, delay in enumerate(delays):
        done = interrupt_at([*base, f"{prefix}{i}"], env, delay)
        results.append((round(delay, 3), done.returncode))
        assert done.returncode == 0 or interrupted(done), (
            delay,
            done.returncode,
            done.stderr[-2000:],
        )
    assert leftovers(prefix) == [], results
    assert state_files(env) == []
    assert any(code == 130 for _, code in results), results  # the sweep hit the start-up


def test_ctrl_c_during_vm_start_leaves_nothing(prefix: str, env: dict[str, str]) -> None:
    base = [*CLI, "vm", "start", "--probe", "halt", "--id"]
    delays = sweep([*base, f"{prefix}t"], env, START_POINTS)
    subprocess.run([*CLI, "vm", "stop", f"{prefix}t"], env=env, check=True, capture_output=True)
    results = []
    for i, delay in enumerate(delays):
        vm_id = f"{prefix}{i}"
        done = interrupt_at([*base, vm_id], env, delay)
        results.append((round(delay, 3), done.returncode))
        if done.returncode == 0:  # it answered before the signal: the VM is the user's
            assert done.stdout.strip() == vm_id
            subprocess.run([*CLI, "vm", "stop", vm_id], env=env, check=True, capture_output=True)
            continue
        assert interrupted(done), (delay, done.returncode, done.stderr[-2000:])
    assert leftovers(prefix) == [], results
    assert state_files(env) == [], results
    assert any(code == 130 for _, code in results), results  # the sweep hit the start-up
