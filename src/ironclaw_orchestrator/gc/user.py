"""What ``ironclaw gc`` may look at when it does not run as root.

A non-root user can only run unjailed VMs (development mode), which make no network
namespace, no cgroup and no jail directory: those are made by root, for jailed VMs. So a
user's gc cleans the user's own registry, run directory and VMM processes, and does not scan
the host-wide ``/run/netns``, cgroup trees or chroot bases, where everything it found would
be root's, and every attempt to remove it a spurious permission failure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..registry import VmRecord
from .host import GcHost

__all__ = ["UnprivilegedGcHost", "gc_host_for_user"]


class UnprivilegedGcHost(GcHost):
    """A :class:`GcHost` that sees no host-wide network namespaces or VM cgroups (nor the
    ledger of intermediate cgroup directories)."""

    def list_netns(self) -> list[str]:
        return []

    def cgroup_parent_dirs(self, records: Sequence[VmRecord]) -> list[Path]:
        return []

    def sweep_cgroup_ledger(self) -> list[Path]:
        return []


def gc_host_for_user(uid: int | None = None) -> tuple[GcHost | None, bool]:
    """``(host, scan_jails)`` for ``collect_garbage``: ``(None, True)`` (everything) for root,
    ``(UnprivilegedGcHost(), False)`` for anyone else."""
    if (os.geteuid() if uid is None else uid) == 0:
        return None, True
    return UnprivilegedGcHost(), False
