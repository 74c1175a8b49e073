"""Garbage collection: remove what crashed orchestrators left behind, and nothing else.

Two passes:

1. **Records whose owner is dead** (its pid is gone, or now belongs to a process with another
   start time; :mod:`.records`). The VMM is killed if it is still the same process (pid +
   start time, signalled through a pidfd so a recycled pid is never hit), and so is any
   process still rooted in the record's jail (a VMM whose pid was never recorded); both are
   reaped if they are our children. Then exactly the resources the record names are
   removed, with the functions a VM's own stop uses (:mod:`ironclaw_orchestrator.vm.cleanup`):
   cgroups, network namespace with its tap and uplink, jail directory, run directory, a
   stale API socket, and finally the record. If any step fails the record is kept, so the
   next run retries.

2. **Orphans** (:mod:`.orphans`): resources with no record that are unmistakably ours:
   namespaces ``ironclaw-<id>``, jail directories ``<chroot base>/<exec name>/<id>`` holding
   our marker (made atomically with it) and unfinished claims ``.claim-<id>-<hex>``, run
   directories ``<run root>/vms/<id>``, cgroups ``<parent>/<id>`` under our default parent
   name, empty intermediate cgroups made for VMs, and temporary, config and log files in
   the state directory. Nothing of an id is touched while *any* process on the host uses
   one of its resources (namespace, jail root or cwd, open files, cgroup membership): it
   may be a VM started without a PID namespace, pid file or registry. Orphans younger than
   ``orphan_grace_s`` are skipped as well, since they may be a VM being started right now.

``dry_run=True`` computes and reports the same actions without touching anything. The
result is a :class:`GcReport` (``to_dict()`` is JSON-able).

Call :func:`collect_garbage` from a thread when inside an event loop
(``await asyncio.to_thread(collect_garbage, registry)``): the netlink helpers it uses run
their own loop.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from ..names import JAIL_MARKER, PARENT_CGROUP_NAME
from ..registry import Registry
from .host import GcHost
from .orphans import orphans_pass
from .records import Collector
from .report import GcAction, GcReport

__all__ = [
    "DEFAULT_CHROOT_BASES",
    "DEFAULT_ORPHAN_GRACE_S",
    "JAIL_MARKER",
    "PARENT_CGROUP_NAME",
    "GcAction",
    "GcHost",
    "GcReport",
    "collect_garbage",
]

DEFAULT_CHROOT_BASES: tuple[Path, ...] = (Path("/var/jail"),)
DEFAULT_ORPHAN_GRACE_S = 30.0


def collect_garbage(
    registry: Registry,
    *,
    dry_run: bool = False,
    chroot_bases: Sequence[Path] = DEFAULT_CHROOT_BASES,
    run_root: Path | None = None,
    vm_ids: Collection[str] | None = None,
    orphan_grace_s: float = DEFAULT_ORPHAN_GRACE_S,
    kill_timeout_s: float = 5.0,
    host: GcHost | None = None,
) -> GcReport:
    """Clean up VMs whose owner died, and orphaned resources of ours (see module docstring).

    ``vm_ids`` limits gc to those ids. ``run_root`` defaults to ``$IRONCLAW_RUN_DIR`` or
    ``/run/ironclaw``. Never raises for a failed step: each is in the report with its error.
    """
    if run_root is None:
        from ..vm.rundir import run_root as default_run_root

        run_root = default_run_root()
    collector = Collector(
        registry,
        dry_run=dry_run,
        chroot_bases=chroot_bases,
        run_root=run_root,
        vm_ids=vm_ids,
        orphan_grace_s=orphan_grace_s,
        kill_timeout_s=kill_timeout_s,
        host=host or GcHost(),
    )
    collector.records_pass()
    orphans_pass(collector, [*collector.initial_records, *registry.scan().records])
    return collector.report
