"""Everything made for one jailed VM, and removing it all again (in reverse order).

``start_with_jailer`` fills a :class:`JailResources` as it makes things; stop and a failed
start call :meth:`JailResources.release`, which removes through the same functions gc uses
(:mod:`.cleanup`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CleanupError
from . import cgroups as cg
from . import cleanup
from .staging import StagedFile

__all__ = ["JailResources"]


@dataclass
class JailResources:
    """Everything made for one jailed VM, so that it can all be removed (in reverse)."""

    vm_id: str
    run_dir: Path | None = None
    jail_dir: Path | None = None
    cgroups: cg.VmCgroups | None = None
    netns_name: str | None = None
    tap: str | None = None
    uplink: bool = False
    staged: list[StagedFile] = field(default_factory=list)
    vmm_pid: int | None = None
    vmm_start_time: int | None = None
    #: The jailer was spawned but the VMM's pid is not (yet) known: a VMM may run unwatched.
    vmm_unknown: bool = False
    listener: Callable[[JailResources], None] | None = None

    def changed(self) -> None:
        if self.listener is not None:
            self.listener(self)

    def release(self) -> None:
        """Remove everything; every step runs even if one fails, then one error lists all."""
        failures: list[str] = []
        if self.jail_dir is not None and self.vmm_unknown:
            # A VMM we lost track of (no pid file, start aborted before adoption) may run in
            # the jail: found by its root, killed and reaped before what it uses goes away.
            # (Scanning /proc costs milliseconds: only done when the VMM is not known.)
            try:
                cleanup.kill_jail_processes(self.jail_dir)
            except OSError as exc:
                failures.append(f"processes in {self.jail_dir}: {exc}")
        if self.cgroups is not None:
            cgroups = self.cgroups
            try:
                cgroups.remove()
                self.cgroups = None
            except Exception as exc:
                failures.append(f"cgroups {[str(p) for p in cgroups.paths.values()]}: {exc}")
        if self.netns_name is not None:
            try:
                cleanup.remove_network(self.netns_name, self.vm_id, self.tap, self.uplink)
                self.netns_name, self.tap, self.uplink = None, None, False
            except Exception as exc:
                failures.append(f"network namespace {self.netns_name}: {exc}")
        for label, remove in (
            ("jail_dir", cleanup.remove_jail_tree),
            ("run_dir", cleanup.remove_run_dir),
        ):
            path: Path | None = getattr(self, label)
            if path is None:
                continue
            try:
                remove(path)
                setattr(self, label, None)
            except OSError as exc:
                failures.append(f"{path}: {exc.strerror or exc}")
        if failures:
            raise CleanupError(
                f"VM {self.vm_id}: cleanup left some resources behind (run `ironclaw gc`)",
                failures,
            )
