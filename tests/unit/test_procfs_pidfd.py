"""/proc reading and pidfd signalling: identity by pid + start time, users of a directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ironclaw_orchestrator import pidfd, procfs


def test_read_stat_of_self() -> None:
    st = procfs.read_stat(os.getpid())
    assert st is not None and st.ppid == os.getppid() and not st.exited
    assert procfs.read_start_time(os.getpid()) == st.start_time
    assert procfs.is_alive(os.getpid(), st.start_time)
    assert not procfs.is_alive(os.getpid(), st.start_time + 1)  # a recycled pid
    assert not procfs.is_alive(os.getpid(), None)


def test_read_stat_with_odd_comm(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    fields = " ".join(["S", "7"] + ["0"] * 17 + ["12345"] + ["0"] * 10)
    (tmp_path / "42" / "stat").write_text(f"42 (a) b (c) {fields}\n")
    (tmp_path / "42" / "cgroup").write_text("4:memory:/x/ironclaw/vm-1\n0::/\n")
    st = procfs.read_stat(42, tmp_path)
    assert st is not None and st.comm == "a) b (c" and st.ppid == 7 and st.start_time == 12345
    assert procfs.cgroup_paths(42, tmp_path) == ["/x/ironclaw/vm-1", "/"]
    index = procfs.cgroup_index(tmp_path)
    assert index["vm-1"] == [42] and index["ironclaw"] == [42] and "vm" not in index


def test_zombie_is_not_alive() -> None:
    child = subprocess.Popen(["true"])
    start = procfs.read_start_time(child.pid)
    deadline = time.monotonic() + 10
    while (st := procfs.read_stat(child.pid)) is not None and not st.exited:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not procfs.is_alive(child.pid, start)
    child.wait()


def test_pids_using_dir_by_cwd_and_by_chroot(tmp_path: Path) -> None:
    """A jailed VMM's root link reads '/' in its own mount namespace: compare inodes."""
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    jail = tmp_path / "base" / "fc" / "vm-1"
    root = jail / "root"
    (root / "run").mkdir(parents=True)
    code = (
        "import os, sys, time; os.chroot(sys.argv[1]); os.chdir('/'); "
        "print('in', flush=True); time.sleep(60)"
    )
    rooted = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE)
    in_cwd = subprocess.Popen(["sleep", "60"], cwd=root / "run")
    try:
        assert rooted.stdout is not None and rooted.stdout.readline() == b"in\n"
        users = procfs.pids_using_dir(jail)
        assert rooted.pid in users and in_cwd.pid in users
        assert procfs.pids_using_dir(tmp_path / "base" / "fc" / "other") == []
    finally:
        for p in (rooted, in_cwd):
            p.kill()
            p.wait()


def test_kill_and_reap_checks_identity_first() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        start = procfs.read_start_time(child.pid)
        assert start is not None
        assert pidfd.kill_and_reap(child.pid, start + 1) == "gone"  # not the recorded process
        assert procfs.is_alive(child.pid, start)
        assert pidfd.kill_and_reap(child.pid, start) == "killed"
        assert not Path(f"/proc/{child.pid}").exists()  # reaped: no zombie left
    finally:
        child.kill()
        with contextlib.suppress(ChildProcessError):
            child.wait(1)


def test_reap_returns_exit_code_and_wait_times_out() -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    quitter = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        with pidfd.opened(sleeper.pid) as fd:
            assert fd is not None
            assert not pidfd.wait_exit(fd, 0.05)
            assert pidfd.reap(fd) is None  # still running
            assert pidfd.send_signal(fd, 9)
            assert pidfd.wait_exit(fd, 10)
            assert pidfd.reap(fd) == -9
        with pidfd.opened(quitter.pid) as fd:
            assert fd is not None and pidfd.wait_exit(fd, 10)
            assert pidfd.reap(fd) == 3
            assert not pidfd.send_signal(fd, 9)  # reaped: nothing left to signal
    finally:
        for p in (sleeper, quitter):
            try:
                p.kill()
                p.wait(1)
            except (ChildProcessError, ProcessLookupError):
                pass
