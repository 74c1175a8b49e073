"""paths.py: the per-user base directory's fallbacks and mode, and writable_ancestor."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ironclaw_orchestrator import paths

UID = os.geteuid()
USER = UID if UID != 0 else 4242


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _own(path: Path) -> None:
    """Make ``path`` belong to the non-root uid the checks use (as root: chown it)."""
    if UID == 0:
        os.chown(path, USER, -1)


def test_runtime_dir_that_is_a_file_is_not_used(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.write_text("")
    _own(runtime)
    env = {"XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path / "h")}
    assert paths.user_base_dir(env, uid=USER, create=False) == tmp_path / "h/.local/state/ironclaw"


def test_usable_runtime_dir_is_not_created_without_create(tmp_path: Path) -> None:
    _own(tmp_path)
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    assert paths.user_base_dir(env, uid=USER, create=False) == tmp_path / "ironclaw"
    assert not (tmp_path / "ironclaw").exists()


def test_relative_runtime_dir_is_ignored_even_if_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rel").mkdir()
    _own(tmp_path / "rel")
    env = {"XDG_RUNTIME_DIR": "rel", "HOME": str(tmp_path / "h")}
    assert paths.user_base_dir(env, uid=USER, create=False) == tmp_path / "h/.local/state/ironclaw"


def test_base_dir_defaults_to_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No env, no uid: the process environment and effective uid are used."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # ours: we made it
    assert paths.user_base_dir(create=False) == tmp_path / "ironclaw"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert paths.user_base_dir(create=False) == tmp_path / "h/.local/state/ironclaw"


def test_each_default_makes_the_base_by_default(tmp_path: Path) -> None:
    run = paths.default_run_dir({"HOME": str(tmp_path / "a")}, uid=USER)
    assert run == tmp_path / "a/.local/state/ironclaw" and _mode(run) == 0o700
    state = paths.default_state_dir({"HOME": str(tmp_path / "b")}, uid=USER)
    assert state.parent == tmp_path / "b/.local/state/ironclaw" and _mode(state.parent) == 0o700
    assert not state.exists()  # the registry makes its own directory
    base = paths.user_base_dir({"HOME": str(tmp_path / "c")}, uid=USER)
    assert _mode(base) == 0o700


def test_empty_home_falls_back_to_the_password_database(tmp_path: Path) -> None:
    env = {"HOME": ""}
    expected = Path(os.path.expanduser("~")) / ".local" / "state" / "ironclaw"
    assert paths.user_base_dir(env, uid=USER, create=False) == expected


def test_made_base_and_its_parent_are_private(tmp_path: Path, umask: None) -> None:
    home = tmp_path / "home"
    base = paths.user_base_dir({"HOME": str(home)}, uid=USER)
    assert base == home / ".local/state/ironclaw"
    assert _mode(base) == 0o700
    assert _mode(base.parent) == 0o700  # ~/.local/state, made by us


def test_base_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    state = tmp_path / "home/.local/state"
    state.mkdir(parents=True)
    old = os.umask(0o100)  # would make the directory 0600 (unusable)
    try:
        base = paths.user_base_dir({"HOME": str(tmp_path / "home")}, uid=USER)
    finally:
        os.umask(old)
    assert _mode(base) == 0o700


def test_base_that_cannot_be_made_is_still_returned(tmp_path: Path) -> None:
    (tmp_path / "home").write_text("a file where the home directory should be")
    base = paths.user_base_dir({"HOME": str(tmp_path / "home")}, uid=USER)
    assert base == tmp_path / "home/.local/state/ironclaw"
    assert not base.exists()


def test_defaults_use_the_process_uid_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IRONCLAW_RUN_DIR", raising=False)
    monkeypatch.delenv("IRONCLAW_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    if UID == 0:
        assert paths.default_run_dir() == Path("/run/ironclaw")
        assert paths.default_state_dir() == Path("/run/ironclaw/registry")
    else:
        base = tmp_path / ".local/state/ironclaw"
        assert paths.default_run_dir(create=False) == base
        assert paths.default_state_dir(create=False) == base / "registry"
    monkeypatch.setenv("IRONCLAW_RUN_DIR", str(tmp_path / "r"))
    assert paths.default_run_dir() == tmp_path / "r"
    monkeypatch.setenv("IRONCLAW_STATE_DIR", "")  # empty: as if unset
    assert paths.default_state_dir(uid=0) == Path("/run/ironclaw/registry")


def test_non_root_defaults_do_not_create_when_told(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "h")}
    assert (
        paths.default_run_dir(env, uid=USER, create=False) == tmp_path / "h/.local/state/ironclaw"
    )
    assert paths.default_state_dir(env, uid=USER, create=False).name == "registry"
    assert not (tmp_path / "h").exists()


def test_writable_ancestor(tmp_path: Path) -> None:
    assert paths.writable_ancestor(tmp_path) == tmp_path
    assert paths.writable_ancestor(tmp_path / "a" / "b" / "c") == tmp_path
    (tmp_path / "f").write_text("")
    (tmp_path / "f").chmod(0o700)  # writable and executable, but still not a directory
    assert paths.writable_ancestor(tmp_path / "f") is None
    assert paths.writable_ancestor(tmp_path / "f" / "below") is None


@pytest.mark.skipif(UID == 0, reason="root may write anywhere")
def test_writable_ancestor_read_only(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        assert paths.writable_ancestor(ro / "x") is None
    finally:
        ro.chmod(0o700)
