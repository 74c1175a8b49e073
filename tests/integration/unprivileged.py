"""A throw-away unprivileged user with /dev/kvm access, for tests of the non-root path.

:func:`unprivileged_user` (root only) creates a user with its own group and home, gives
that group read-write access to ``/dev/kvm`` for the duration (``chgrp`` + ``chmod g+rw``,
which works without the acl tools), and afterwards restores ``/dev/kvm``'s owner, group and
mode exactly, kills anything the user still runs and removes the user, its group and home.
A host-wide lock serialises the /dev/kvm change between concurrent test runs, so one run
never restores a state another run set up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

KVM = Path("/dev/kvm")
LOCK = Path("/run/lock/ironclaw-test-kvm-access.lock")
#: Environment variables the user's commands keep from ours (binaries, cgroup and jail
#: settings the test run was given); everything else is a clean login-like environment.
PASS_ENV = ("IRONCLAW_FIRECRACKER", "IRONCLAW_JAILER", "LANG", "LC_ALL")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": "/usr/local/bin:/usr/bin:/bin",
        }
        env.update({k: os.environ[k] for k in PASS_ENV if k in os.environ})
        env.update(extra or {})
        return env

    def python(self) -> tuple[str, dict[str, str]] | str:
        """An interpreter this user can run that imports our package: ``(path, env)``;
        else why not (our own may live below a home the user cannot enter)."""
        import ironclaw_orchestrator

        major_minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
        candidates = [os.path.realpath(sys.executable), f"/usr/bin/python{major_minor}",
                      f"/usr/local/bin/python{major_minor}"]  # fmt: skip
        paths = [str(Path(ironclaw_orchestrator.__file__).resolve().parents[1])]
        paths += [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
        env = {"PYTHONPATH": os.pathsep.join(paths)}
        probe = "import ironclaw_orchestrator.cli, pydantic_core, httpx"
        errors = []
        for exe in dict.fromkeys(candidates):
            if not os.path.exists(exe):
                continue
            result = self.run([exe, "-c", probe], env=env)
            if result.returncode == 0:
                return exe, env
            errors.append(f"{exe}: {result.stderr.strip().splitlines()[-1:]}")
        return f"no Python {major_minor} that user {self.name} can run imports ironclaw: {errors}"

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 120.0,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as this user (``runuser``), with a clean environment plus ``env``."""
        return subprocess.run(
            ["runuser", "-u", self.name, "--", "env", "-i", *_pairs(self.env(env)), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd or self.home,
            stdin=subprocess.DEVNULL,
        )


def _pairs(env: Mapping[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in env.items()]


def skip_reason() -> str | None:
    """Why the unprivileged-user tests cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "needs root to create a throw-away user and grant it /dev/kvm"
    if not KVM.exists():
        return "/dev/kvm does not exist"
    for tool in ("useradd", "userdel", "runuser"):
        if not any(Path(d, tool).exists() for d in ("/usr/sbin", "/sbin", "/usr/bin")):
            return f"{tool} is not installed"
    return None


def _procs_of(uid: int) -> list[psutil.Process]:
    """Running processes of ``uid``; its exited children of ours (pytest may be a subreaper,
    inheriting the user's orphaned supervisors) are reaped, not counted."""
    out = []
    for proc in psutil.process_iter(["uids", "status", "ppid"]):
        uids = proc.info["uids"]
        if uids is None or uid not in (uids.real, uids.effective):
            continue
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            if proc.info["ppid"] == os.getpid():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(proc.pid, os.WNOHANG)
            continue
        out.append(proc)
    return out


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} ({proc.status()}): {' '.join(proc.cmdline()) or proc.name()}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


def _kill_all_of(uid: int, grace_s: float = 15.0) -> list[str]:
    """Kill what ``uid`` (a user this module created) still runs after ``grace_s``, in
    which processes that are on their way out (a supervisor exiting after `vm stop`) end."""
    deadline = time.monotonic() + grace_s
    while (procs := _procs_of(uid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    found = [_describe(p) for p in procs]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    return found


@contextlib.contextmanager
def unprivileged_user(*, kvm_access: bool = True) -> Iterator[User]:
    """A new user (and group, and home) that can use /dev/kvm; everything undone afterwards.

    Fails (after cleaning up) if the user still ran a process when the test ended.
    """
    name = f"icit-{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--create-home", "--user-group", "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam(name)
    user = User(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))
    leftover: list[str] = []
    try:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            before = os.stat(KVM)
            try:
                if kvm_access:
                    os.chown(KVM, -1, user.gid)
                    os.chmod(KVM, stat.S_IMODE(before.st_mode) | stat.S_IRGRP | stat.S_IWGRP)
                try:
                    yield user
                finally:
                    leftover = _kill_all_of(user.uid)
            finally:
                os.chown(KVM, before.st_uid, before.st_gid)
                os.chmod(KVM, stat.S_IMODE(before.st_mode))
    finally:
        leftover += _kill_all_of(user.uid)
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            raise AssertionError(f"user {name} could not be removed")
    assert not leftover, f"the test left processes of user {name} running: {leftover}"
