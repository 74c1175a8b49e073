"""The orchestrator's private run directory: one 0700 directory per VM on the host side.

It holds the console log and, for unjailed VMs, the API socket. Where it is (``/run/ironclaw``
for root, a per-user directory otherwise, ``IRONCLAW_RUN_DIR`` to override) is decided in
:mod:`ironclaw_orchestrator.paths`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import names
from ..errors import StagingError
from ..fsflags import spread_subdirs, spread_subdirs_once
from ..paths import RUN_DIR_ENV as RUN_DIR_ENV  # re-exported: importers use it from here
from ..paths import default_run_dir
from ..safetree import rmtree_nofollow

DEFAULT_RUN_DIR = Path("/run/ironclaw")  # root's default; see ironclaw_orchestrator.paths
CONSOLE_LOG = "console.log"


def run_root() -> Path:
    return default_run_dir()


def vm_run_dir(vm_id: str) -> Path:
    return names.vm_run_dir(run_root(), vm_id)


def create_vm_run_dir(vm_id: str) -> Path:
    """Create the VM's private run directory; it must not exist yet (the id is in use)."""
    path = vm_run_dir(vm_id)
    try:
        spread_subdirs_once(str(path.parent))  # unrelated trees: spread them (ext4 Orlov)
        try:
            os.mkdir(path, 0o700)
        except FileNotFoundError:  # the first VM under this run root
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            spread_subdirs(str(path.parent))
            os.mkdir(path, 0o700)
    except FileExistsError:
        raise StagingError(
            f"VM {vm_id}: run directory {path} already exists, so the id is in use (or a crashed "
            "run left it behind: `ironclaw gc` removes leftovers)"
        ) from None
    except OSError as exc:
        raise StagingError(
            f"VM {vm_id}: cannot create run directory {path}: {exc.strerror}; set "
            f"{RUN_DIR_ENV} to a writable directory"
        ) from exc
    os.chmod(path, 0o700)
    return path


def remove_vm_run_dir(path: Path) -> None:
    """Kept for importers: removes like :func:`.cleanup.remove_run_dir` (no symlink followed)."""
    rmtree_nofollow(path)
