"""Default host directories: root keeps /run/ironclaw, other users get a private per-user one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ironclaw_orchestrator import paths
from ironclaw_orchestrator.registry import default_state_dir as registry_default
from ironclaw_orchestrator.vm.rundir import run_root

UID = os.geteuid()
OTHER_UID = 4242 if UID != 4242 else 4343


def test_root_keeps_run_ironclaw(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "HOME": str(tmp_path)}
    assert paths.default_run_dir(env, uid=0) == Path("/run/ironclaw")
    assert paths.default_state_dir(env, uid=0) == Path("/run/ironclaw/registry")
    assert list(tmp_path.iterdir()) == []  # nothing made for root


def _user() -> int:
    """A non-root uid for the checks: ours, or (as root) another one."""
    return UID if UID != 0 else OTHER_UID


def test_user_gets_xdg_runtime_dir_made_0700(tmp_path: Path) -> None:
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    if UID == 0:
        os.chown(runtime, _user(), -1)  # pam_systemd makes it owned by the user
    env = {"XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path / "home")}
    old = os.umask(0o022)
    try:
        run = paths.default_run_dir(env, uid=_user())
        state = paths.default_state_dir(env, uid=_user())
    finally:
        os.umask(old)
    assert run == runtime / "ironclaw"
    assert state == run / "registry"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    assert not (tmp_path / "home").exists()


def test_env_variables_override(tmp_path: Path) -> None:
    env = {"IRONCLAW_RUN_DIR": str(tmp_path / "r"), "IRONCLAW_STATE_DIR": str(tmp_path / "s")}
    for uid in (0, OTHER_UID):
        assert paths.default_run_dir(env, uid=uid) == tmp_path / "r"
        assert paths.default_state_dir(env, uid=uid) == tmp_path / "s"


@pytest.mark.parametrize("runtime", ["", "relative/dir", "/nonexistent/ironclaw-x", "other"])
def test_unusable_xdg_runtime_dir_falls_back_to_local_state(tmp_path: Path, runtime: str) -> None:
    if runtime == "other":  # exists but belongs to someone else: not ours to use
        if UID != 0:
            pytest.skip("needs root to make a directory owned by another user")
        other = tmp_path / "other"
        other.mkdir()
        os.chown(other, OTHER_UID + 1, -1)
        runtime = str(other)
    home = tmp_path / "home"
    env = {"XDG_RUNTIME_DIR": runtime, "HOME": str(home)}
    base = paths.user_base_dir(env, uid=_user(), create=False)
    assert base == home / ".local" / "state" / "ironclaw"
    assert not base.exists()
    assert paths.default_state_dir(env, uid=_user()) == base / "registry"
    assert paths.default_run_dir(env, uid=_user()) == base
    assert stat.S_IMODE(base.stat().st_mode) == 0o700


def test_existing_base_dir_is_left_as_it_is(tmp_path: Path) -> None:
    base = tmp_path / "ironclaw"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert paths.user_base_dir(env, uid=UID) == base
    assert stat.S_IMODE(base.stat().st_mode) == 0o755  # the registry refuses it if unsafe


def test_rundir_and_registry_delegate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IRONCLAW_RUN_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("IRONCLAW_STATE_DIR", str(tmp_path / "s"))
    assert run_root() == tmp_path / "r"
    assert registry_default() == tmp_path / "s"
    monkeypatch.delenv("IRONCLAW_RUN_DIR")
    monkeypatch.delenv("IRONCLAW_STATE_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if UID == 0:
        assert run_root() == Path("/run/ironclaw")
        assert registry_default() == Path("/run/ironclaw/registry")
    else:
        assert run_root() == tmp_path / "ironclaw"
        assert registry_default() == tmp_path / "ironclaw" / "registry"
