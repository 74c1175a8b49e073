"""Admission on one host: may another VM start here, now?

Three rules, checked in this order, each refusing at once with its own error (never by
making the caller wait):

1. draining (SIGTERM received): :class:`DrainingError` (HTTP 503);
2. at most ``max_starting`` VMs starting at once: :class:`TooManyStartingError` (429);
3. committed vCPUs and memory, plus this VM, must fit in capacity times the overcommit
   ratio: :class:`HostFullError` (429).

"Committed" is read from the registry (every VM recorded on this host, however it was
started) plus the reservations of starts in flight, so that nothing but the starts in
flight lives only in this process's memory. A reservation is held from admission until
the start returns; by then the VM's record carries its share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..errors import RegistryError
from ..registry import Registry
from .errors import DrainingError, HostFullError, TooManyStartingError
from .settings import AgentSettings

__all__ = ["Admission", "Capacity", "Usage"]


@dataclass(frozen=True)
class Usage:
    vcpus: int = 0
    memory_mb: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.vcpus + other.vcpus, self.memory_mb + other.memory_mb)


@dataclass(frozen=True)
class Capacity:
    """What the host has, and what it admits (capacity times overcommit)."""

    vcpus: int
    memory_mb: int
    cpu_overcommit: float
    memory_overcommit: float

    @property
    def admit_vcpus(self) -> int:
        return int(self.vcpus * self.cpu_overcommit)

    @property
    def admit_memory_mb(self) -> int:
        return int(self.memory_mb * self.memory_overcommit)

    @classmethod
    def of_host(cls, settings: AgentSettings) -> Capacity:
        vcpus = settings.capacity_vcpus or os.cpu_count() or 1
        memory = settings.capacity_memory_mb
        if memory is None:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20
            memory = max(0, total - settings.reserved_memory_mb)
        return cls(vcpus, memory, settings.cpu_overcommit, settings.memory_overcommit)


class Admission:
    """Decides admission; one instance per agent, used from its event loop only."""

    def __init__(
        self,
        registry: Registry,
        capacity: Capacity,
        max_starting: int,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.registry = registry
        self.capacity = capacity
        self.max_starting = max_starting
        self.draining = False
        self.starting: dict[str, Usage] = {}
        self._on_change = on_change

    def committed(self) -> Usage:
        """vCPUs and memory of every registered VM plus the starts in flight."""
        total = Usage()
        for rec in self.registry.list():
            if rec.vm_id not in self.starting:
                total += Usage(rec.vcpus or 0, rec.memory_mb or 0)
        for usage in self.starting.values():
            total += usage
        return total

    def check(self, vm_id: str, want: Usage) -> None:
        """Raise the refusal that applies to starting ``want`` now, if any."""
        if self.draining:
            raise DrainingError(
                "this host agent is draining (it received SIGTERM): it starts no new VMs; "
                "send the VM to another host",
                retry_after_s=None,
            )
        if len(self.starting) >= self.max_starting:
            raise TooManyStartingError(
                f"{len(self.starting)} VMs are starting on this host, the most it starts at "
                f"once (--max-starting {self.max_starting}); retry in a moment or elsewhere",
                retry_after_s=1.0,
            )
        used = self.committed()
        cap = self.capacity
        if used.vcpus + want.vcpus > cap.admit_vcpus:
            raise HostFullError(
                f"host full: VM {vm_id} needs {want.vcpus} vCPU(s) but {used.vcpus} of "
                f"{cap.admit_vcpus} admissible are committed ({cap.vcpus} CPUs x overcommit "
                f"{cap.cpu_overcommit:g}); stop a VM or place it on another host"
            )
        if used.memory_mb + want.memory_mb > cap.admit_memory_mb:
            raise HostFullError(
                f"host full: VM {vm_id} needs {want.memory_mb} MiB but {used.memory_mb} of "
                f"{cap.admit_memory_mb} MiB admissible are committed ({cap.memory_mb} MiB x "
                f"overcommit {cap.memory_overcommit:g}); stop a VM or place it on another host"
            )

    @contextlib.contextmanager
    def reserve(self, vm_id: str, want: Usage) -> Iterator[None]:
        """Admit ``vm_id`` (or raise) and hold its reservation until the block ends."""
        if vm_id in self.starting:
            raise RegistryError(f"VM id {vm_id} is in use: it is being started right now")
        self.check(vm_id, want)
        self.starting[vm_id] = want
        try:
            yield
        finally:
            del self.starting[vm_id]
            if self._on_change is not None:
                self._on_change()
