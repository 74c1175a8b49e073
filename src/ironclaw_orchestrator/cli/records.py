"""Finding VMs in the registry from the command line: shared by the ``vm`` subcommands."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from ..registry import Registry, VmRecord
from .common import fail

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def open_registry() -> Registry:
    """The registry of ``--state-dir`` / ``$IRONCLAW_STATE_DIR`` (``RegistryError`` if unsafe)."""
    return Registry()


def get_record(registry: Registry, vm_id: str) -> VmRecord:
    """The record of ``vm_id``; exits 2 with a clear message if there is none."""
    record = registry.get(vm_id)
    if record is None:
        fail(
            f"no VM {vm_id!r} in the registry {registry.state_dir}: see `ironclaw vm ls` "
            "(or pass the --state-dir it was started with)"
        )
    return record


def format_duration(seconds: float) -> str:
    """``42s``, ``5m07s``, ``3h02m``, ``2d04h``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def uptime_s(record: VmRecord, now: datetime | None = None) -> float:
    """Seconds since the VM's id was claimed."""
    return ((now or datetime.now(UTC)) - record.created_at).total_seconds()
