"""Where the orchestrator keeps its host-side directories: the one home for their defaults.

Two directories, each overridable by an environment variable:

========================  =========================  =====================================
what                      root (production)          any other user (development mode)
========================  =========================  =====================================
run dir                   ``/run/ironclaw``          ``$XDG_RUNTIME_DIR/ironclaw``
(``IRONCLAW_RUN_DIR``)                               (fallback ``~/.local/state/ironclaw``)
state dir (registry)      ``/run/ironclaw/registry`` ``<run dir default>/registry``
(``IRONCLAW_STATE_DIR``)
========================  =========================  =====================================

The run dir holds one 0700 directory per VM (console log; API socket of an unjailed VM); the
state dir holds the VM registry (:mod:`ironclaw_orchestrator.registry`). A non-root user's
base directory is created 0700 on first use, so that ``ironclaw vm run``, ``vm ls`` and
``gc`` work without exporting anything. ``$XDG_RUNTIME_DIR`` is used only when it is an
absolute path to an existing directory owned by the user (as ``pam_systemd`` makes it);
otherwise, as on hosts without a login session, ``~/.local/state`` is.

This module imports nothing else of the package.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "APP_DIR_NAME",
    "RUN_DIR_ENV",
    "STATE_DIR_ENV",
    "SYSTEM_RUN_DIR",
    "SYSTEM_STATE_DIR",
    "default_run_dir",
    "default_state_dir",
    "user_base_dir",
    "writable_ancestor",
]

RUN_DIR_ENV = "IRONCLAW_RUN_DIR"
STATE_DIR_ENV = "IRONCLAW_STATE_DIR"
APP_DIR_NAME = "ironclaw"
SYSTEM_RUN_DIR = Path("/run/ironclaw")
SYSTEM_STATE_DIR = SYSTEM_RUN_DIR / "registry"
#: Below the run dir default (and the user base): the registry.
REGISTRY_SUBDIR = "registry"


def _usable_runtime_dir(value: str | None, uid: int) -> Path | None:
    """``$XDG_RUNTIME_DIR`` if it is an absolute, existing directory owned by ``uid``."""
    if not value or not os.path.isabs(value):
        return None
    try:
        st = os.stat(value)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
        return None
    return Path(value)


def user_base_dir(
    env: Mapping[str, str] | None = None, *, uid: int | None = None, create: bool = True
) -> Path:
    """A non-root user's base directory (see the module docstring); made 0700 if missing.

    If it cannot be created, the path is returned anyway: the code that uses it reports the
    failure with the path and the variable to set.
    """
    env = os.environ if env is None else env
    uid = os.geteuid() if uid is None else uid
    runtime = _usable_runtime_dir(env.get("XDG_RUNTIME_DIR"), uid)
    if runtime is not None:
        base = runtime / APP_DIR_NAME
    else:
        home = env.get("HOME") or os.path.expanduser("~")
        base = Path(home) / ".local" / "state" / APP_DIR_NAME
    if create:
        _make_private(base)
    return base


def _make_private(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    except FileExistsError:
        return  # keep what is there: the registry checks the state dir's owner and mode
    except OSError:
        return
    os.chmod(path, 0o700)  # exact, whatever the umask


def _is_root(uid: int | None) -> bool:
    return (os.geteuid() if uid is None else uid) == 0


def default_run_dir(
    env: Mapping[str, str] | None = None, *, uid: int | None = None, create: bool = True
) -> Path:
    """``$IRONCLAW_RUN_DIR``, else ``/run/ironclaw`` for root, else the user base dir
    (made 0700 unless ``create=False``)."""
    env = os.environ if env is None else env
    if value := env.get(RUN_DIR_ENV):
        return Path(value)
    if _is_root(uid):
        return SYSTEM_RUN_DIR
    return user_base_dir(env, uid=uid, create=create)


def default_state_dir(
    env: Mapping[str, str] | None = None, *, uid: int | None = None, create: bool = True
) -> Path:
    """``$IRONCLAW_STATE_DIR``, else ``/run/ironclaw/registry`` for root, else
    ``<user base dir>/registry`` (the base made 0700 unless ``create=False``)."""
    env = os.environ if env is None else env
    if value := env.get(STATE_DIR_ENV):
        return Path(value)
    if _is_root(uid):
        return SYSTEM_STATE_DIR
    return user_base_dir(env, uid=uid, create=create) / REGISTRY_SUBDIR


def writable_ancestor(path: Path) -> Path | None:
    """The nearest existing directory at or above ``path``, if we may create entries in it
    (``None`` if that directory is not writable): can ``path`` be made or used by us?"""
    for candidate in (path, *path.parents):
        if candidate.exists():
            ok = candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
            return candidate if ok else None
    return None
