"""Keeping a VM's registry record in step with what exists on the host.

Three writes per VM, each before what it protects exists: the claim (the id and the VM's
uid/gid), then ``start_with_jailer``'s ``on_change`` once the run and jail directories are
claimed (exclusively: known to be ours) and before the network namespace is made, then the
whole record once the VM runs (VMM pid and start time, the cgroup directories made). An
orchestrator killed in between leaves a record naming the jail, run dir and namespace; the
VMM is found and killed by its root inside the recorded jail, and cgroup directories made
after the second write are found by the VM's name (``ironclaw gc``'s orphan pass, which a
released record's id skips the grace period for). Fewer writes keep the registry off the
start-up path (issue: per-VM CPU), without a resource nobody knows about; only the claim
makes a file, the two updates overwrite it in place (see :mod:`..registry.store`).

Why not two writes (the claim naming the run dir, jail and namespace too): those names are
recorded only once they are known to be ours (made exclusively), because gc removes what a
record names; at the claim they may still belong to another orchestrator's VM of the same
id.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from ..errors import RegistryError
from ..registry import Registry, VmRecord
from .jailer import JailerProcess, JailResources

if TYPE_CHECKING:
    from . import FirecrackerProcess


def resource_fields(res: JailResources) -> dict[str, Any]:
    """Registry fields for what ``res`` says exists (or is about to)."""
    return {
        "run_dir": res.run_dir,
        "jail_dir": res.jail_dir,
        "cgroups": res.cgroups.to_dict() if res.cgroups is not None else None,
        "netns_name": res.netns_name,
        "tap": res.tap,
        "uplink": res.uplink,
        "vmm_pid": res.vmm_pid,
        "vmm_start_time": res.vmm_start_time,
        "sandboxed": True,
    }


def record_fields(vm: FirecrackerProcess) -> dict[str, Any]:
    """Registry fields describing a started VM and what was made for it."""
    vmm = vm.vmm
    fields: dict[str, Any] = {
        "vmm_pid": vm.pid,
        "vmm_start_time": vmm.process.start_time,  # read at spawn/adoption, never after a reap
        "sandboxed": vm.is_sandboxed,
        "api_socket": vm.socket_path,
        "console_path": vm.console_path,
        "vcpus": vm.config.vcpu_count,
        "memory_mb": vm.config.memory_mb,
    }
    if isinstance(vmm, JailerProcess):
        fields.update(resource_fields(vmm.resources))
        fields.update(
            uid=vmm.config.uid, gid=vmm.config.gid, memory_limit_mb=vmm.config.memory_limit_mb
        )
    else:
        fields["run_dir"] = vmm.run_dir
    return fields


class VmRecorder:
    """The registry record of one VM: claimed (or adopted), updated, released."""

    def __init__(
        self, registry: Registry, vm_id: str, *, owns_claim: bool, record: VmRecord | None = None
    ) -> None:
        self.registry = registry
        self.vm_id = vm_id
        #: The record as claimed (with the VM's uid/gid when the claim allocated them).
        self.record = record
        #: Release the record at stop (we claimed it); otherwise the claimer does.
        self.owns_claim = owns_claim

    def on_change(self, res: JailResources) -> None:
        self.registry.update(self.vm_id, **resource_fields(res))

    def started(self, vm: FirecrackerProcess) -> None:
        self.registry.update(self.vm_id, **record_fields(vm))

    def stopped(self, vm: FirecrackerProcess, *, cleaned: bool) -> None:
        """After stop: drop the record, or make it name only what is left for ``gc``."""
        if cleaned:
            if self.owns_claim:
                self.registry.release(self.vm_id)
            return
        if isinstance(vm.vmm, JailerProcess):
            with contextlib.suppress(RegistryError):
                self.on_change(vm.vmm.resources)

    def abandoned(self) -> None:
        """The start failed and cleaned up after itself: forget the id."""
        if self.owns_claim:
            self.registry.release(self.vm_id)
