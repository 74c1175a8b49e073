"""Everything made for one jailed VM, and removing it all again (in reverse order).

``start_with_jailer`` fills a :class:`JailResources` as it makes things; stop and a failed
start call :meth:`JailResources.release`, which removes through the same functions gc uses
(:mod:`.cleanup`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CleanupError
from ..safetree import RemovalBudget
from . import cgroups as cg
from . import cleanup
from . import netns as ns
from .staging import StagedFile

__all__ = ["INLINE_REMOVAL_BYTES", "INLINE_REMOVAL_ENTRIES", "JailResources"]

#: What a release may remove on the event loop (see :meth:`JailResources.release_inline`):
#: a jail usually holds the jailer's copy of firecracker (3-5 MB, about 0.5 ms to free) and
#: a dozen entries; a bigger one (a snapshot's memory file, a copied disk) goes to a thread.
INLINE_REMOVAL_BYTES = 16 << 20
INLINE_REMOVAL_ENTRIES = 256


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
    #: An rtnetlink socket inside the VM's namespace (see :mod:`.netns.pool`): with no
    #: ``netns_name``, what holds a nameless namespace besides the VMM. Not recorded: it
    #: dies with this process, and the namespace once the VMM is gone too.
    netns_probe: socket.socket | None = field(default=None, repr=False, compare=False)
    #: Our descriptor of a nameless namespace, which the jailer opens as
    #: ``/proc/<our pid>/fd/<fd>``; closed once the VM is ready.
    netns_fd: int | None = field(default=None, repr=False, compare=False)
    #: Set by stop once it has reaped the VMM: with the cgroups gone, nothing the VM started
    #: can still run, so its namespace may be reused (never after a failed start).
    vmm_reaped: bool = False

    def changed(self) -> None:
        if self.listener is not None:
            self.listener(self)

    def close_netns_fd(self) -> None:
        """Close our descriptor of a nameless namespace (the jailer has joined it, or will
        not); the probe still holds the namespace."""
        fd, self.netns_fd = self.netns_fd, None
        if fd is not None:
            os.close(fd)

    def release_inline(self) -> bool:
        """The usual release, when its work is short and bounded: ``True`` if all is gone.

        Run on the event loop: on a loaded host a hop to a thread and back costs more than
        this work (the GIL changes hands at each system call of the thread). So only what
        cannot wait on another process or grow with the guest is done here: the VM's own
        cgroup directories when no lock or drain is needed, a nameless namespace (one with a
        name goes by netlink, in a thread), and the jail and run directories
        within ``INLINE_REMOVAL_*``. ``False`` at the first step that does not fit (or fails): what
        is done is marked done or safe to redo, and :meth:`release` (in a thread) does the rest
        and reports.
        """
        if self.jail_dir is not None and self.vmm_unknown:
            return False
        if self.netns_name is not None or self.tap is not None or self.uplink:
            return False
        try:
            if self.cgroups is not None:
                if not self.cgroups.remove_lock_free():
                    return False
                self.cgroups = None
            self._release_nameless_netns(reusable=True)
            budget = RemovalBudget(INLINE_REMOVAL_BYTES, INLINE_REMOVAL_ENTRIES)
            if self.jail_dir is not None:
                cleanup.remove_jail_tree(self.jail_dir, budget)
                self.jail_dir = None
            if self.run_dir is not None:
                cleanup.remove_run_dir(self.run_dir, budget)
                self.run_dir = None
        except Exception:  # OverBudget, or a failure: release() redoes it and reports it
            return False
        return True

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
        if self.netns_name is not None:  # a named one (tap, uplink or a confined jailer)
            try:
                cleanup.remove_network(self.netns_name, self.vm_id, self.tap, self.uplink)
                self.netns_name, self.tap, self.uplink = None, None, False
            except Exception as exc:
                failures.append(f"network namespace {self.netns_name}: {exc}")
        # A nameless one is reused only if nothing can still run inside: the cgroups are
        # gone (rmdir fails while a task is in one) and nothing failed before.
        self._release_nameless_netns(reusable=not failures and self.cgroups is None)
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

    def _release_nameless_netns(self, *, reusable: bool) -> None:
        """Let go of a nameless namespace (a start's, or a stopped VM's): our descriptor,
        then the probe, which goes back to the pool if ``reusable`` (see below)."""
        self.close_netns_fd()
        probe, self.netns_probe = self.netns_probe, None
        self._hand_back_netns(probe, reusable=reusable)

    def _hand_back_netns(self, probe: socket.socket | None, *, reusable: bool) -> None:
        """Keep the probe's namespace for a later VM (``reusable``: its cgroups are gone and
        nothing failed; and stop reaped the VMM), else let the probe go, and the namespace
        with it once nothing else holds it."""
        if probe is None:
            return
        if reusable and self.vmm_reaped and not self.vmm_unknown:
            ns.netns_pool.keep(probe)
        else:
            probe.close()
