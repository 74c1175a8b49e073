"""The non-root path for real: a throw-away user with /dev/kvm access runs the CLI and the
library in development mode (unjailed) without setting any variable.

Runs as root (to create the user; see :mod:`unprivileged`), needs /dev/kvm and firecracker.
Everything is undone afterwards: the user, its home, /dev/kvm's owner and mode, and any
process the user still ran (which fails the test).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unprivileged import KVM, User, skip_reason, unprivileged_user

from ironclaw_orchestrator.vm.probe import READY_LINE


def _reason() -> str | None:
    reason = skip_reason()
    found = os.environ.get("IRONCLAW_FIRECRACKER") or shutil.which("firecracker")
    if reason is None and not found:
        reason = "no firecracker binary (put it on PATH or set IRONCLAW_FIRECRACKER)"
    return reason


_REASON = _reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"non-root tests: {_REASON}"),
]


class AsUser:
    """Runs ``python -m ironclaw_orchestrator.cli`` (or a script) as the user."""

    def __init__(self, user: User, extra_env: dict[str, str] | None = None) -> None:
        found = user.python()
        if isinstance(found, str):
            pytest.skip(found)
        self.user = user
        self.python, env = found
        self.env = {**env, **(extra_env or {})}

    def cli(self, *args: str, timeout: float = 120.0) -> tuple[int, str, str]:
        result = self.user.run(
            [self.python, "-m", "ironclaw_orchestrator.cli", *args], env=self.env, timeout=timeout
        )
        return result.returncode, result.stdout, result.stderr

    def script(self, code: str) -> tuple[int, str, str]:
        result = self.user.run([self.python, "-c", textwrap.dedent(code)], env=self.env)
        return result.returncode, result.stdout, result.stderr


@pytest.fixture
def user() -> Iterator[User]:
    kvm_before = os.stat(KVM)
    with unprivileged_user() as u:
        yield u
    kvm_after = os.stat(KVM)
    assert (kvm_after.st_uid, kvm_after.st_gid, kvm_after.st_mode) == (
        kvm_before.st_uid,
        kvm_before.st_gid,
        kvm_before.st_mode,
    ), "/dev/kvm was not restored"


def _private_dir(path: Path, owner: User) -> None:
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o700, f"{path} is {stat.S_IMODE(st.st_mode):o}"
    assert st.st_uid == owner.uid


def test_cli_works_as_a_user_without_any_variable(user: User) -> None:
    as_user = AsUser(user)
    code, out, err = as_user.cli("--version")
    assert code == 0, err
    assert out.startswith("ironclaw-orchestrator ") and "firecracker: v" in out

    code, out, err = as_user.cli("vm", "run", "--id", "nr-run")
    assert code == 0, err
    assert READY_LINE in out
    assert "UNSANDBOXED" in err and f"uid {user.uid}" in err  # the development-mode warning

    code, out, err = as_user.cli("vm", "start", "-d", "--id", "nr-bg", "--probe", "halt")
    assert code == 0, err
    code, out, err = as_user.cli("vm", "ls", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [(v["vm_id"], v["sandboxed"]) for v in listed] == [("nr-bg", False)], listed
    code, out, err = as_user.cli("vm", "stop", "nr-bg")
    assert code == 0, err
    code, out, err = as_user.cli("vm", "ls")
    base = user.home / ".local" / "state" / "ironclaw"
    assert code == 0 and f"no VMs (registry {base / 'registry'})" in err, (out, err)

    code, out, err = as_user.cli("gc")
    assert code == 0, out + err  # sees only the user's own things: nothing of root's
    assert "nothing to clean up" in out

    _private_dir(base, user)
    _private_dir(base / "registry", user)
    _private_dir(base / "vms", user)
    assert list((base / "vms").iterdir()) == []  # the run dirs went with their VMs


def test_doctor_as_a_user_says_what_jailed_mode_needs(user: User) -> None:
    code, out, err = AsUser(user).cli("doctor", "--json")
    assert code == 3, err  # not ready for jailed VMs
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["development mode"]["status"] == "pass"
    assert checks["live boot (unjailed)"]["status"] == "pass", checks["live boot (unjailed)"]
    assert "live boot (jailed)" not in checks  # cannot work as a user: not attempted
    jailed = checks["jailed mode"]
    assert jailed["status"] == "fail" and jailed["value"].startswith("not available: needs root")
    assert f"uid {user.uid}" in jailed["fix"] and "sudo ironclaw doctor" in jailed["fix"]


def test_xdg_runtime_dir_is_used_when_it_is_the_users(user: User) -> None:
    runtime = user.home / ".runtime"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, user.uid, user.gid)
    as_user = AsUser(user, {"XDG_RUNTIME_DIR": str(runtime)})
    code, _out, err = as_user.cli("vm", "start", "-d", "--id", "nr-xdg", "--probe", "halt")
    assert code == 0, err
    try:
        assert (runtime / "ironclaw" / "registry" / "nr-xdg.json").is_file()
        assert (runtime / "ironclaw" / "vms" / "nr-xdg").is_dir()
    finally:
        code, _, err = as_user.cli("vm", "stop", "nr-xdg")
    assert code == 0, err
    _private_dir(runtime / "ironclaw", user)
    assert not (user.home / ".local" / "state" / "ironclaw").exists()


def test_library_async_with_as_a_user(user: User) -> None:
    code, out, err = AsUser(user).script(
        """
        import asyncio, os
        from ironclaw_orchestrator import VmConfig, start_firecracker
        from ironclaw_orchestrator.vm.probe import (PROBE_BOOT_ARGS, ProbeBehaviour,
                                                     probe_kernel_path)

        async def main():
            cfg = VmConfig(vm_id="nr-lib", kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
                           rootfs_path=None, memory_mb=128, boot_args=PROBE_BOOT_ARGS)
            try:
                async with start_firecracker(cfg) as vm:
                    await vm.start_instance()
                    pid, run_dir = vm.pid, vm.console_path.parent
                    raise RuntimeError("boom")
            except RuntimeError:
                pass
            print(vm.is_sandboxed, os.path.exists(f"/proc/{pid}"), run_dir.exists())

        asyncio.run(main())
        """
    )
    assert code == 0, err
    assert out.split() == ["False", "False", "False"]  # stopped and cleaned up on the error


def test_without_kvm_access_the_error_says_how_to_fix_it() -> None:
    with unprivileged_user(kvm_access=False) as user:
        as_user = AsUser(user)
        code, out, err = as_user.cli("vm", "run", "--id", "nr-nokvm")
        assert code != 0
        assert "/dev/kvm" in err, err
        code, out, err = as_user.cli("doctor", "--json", "--no-live")
        checks = {c["name"]: c for c in json.loads(out)["checks"]}
        dev = checks["development mode"]
        assert dev["status"] == "fail" and "kvm" in dev["fix"], dev
