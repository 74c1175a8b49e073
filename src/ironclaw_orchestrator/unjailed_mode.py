"""Force development mode: start a VM without the jailer even where the jailer could run.

``start_firecracker`` decides by itself whether to jail (it jails whenever it can); the CLI's
``--no-jailer`` and ``ironclaw doctor --unjailed`` need the other path on purpose. Until
``vm.start_firecracker`` takes such a switch, this module composes the same public building
blocks: :func:`vm.unjailed.start_unjailed`, :class:`vm.FirecrackerProcess` and the API
pre-configuration step ``start_firecracker`` itself uses.

INSECURE, like every unjailed VM: no chroot, no cgroup limits, no privilege drop.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ConfigError
from .vm import FirecrackerProcess
from .vm import _configure as configure_vm
from .vm.config import VmConfig
from .vm.lifecycle import DEFAULT_READY_TIMEOUT_S
from .vm.staging import check_source
from .vm.unjailed import start_unjailed

__all__ = ["start_unjailed_vm"]

log = logging.getLogger(__name__)


async def start_unjailed_vm(
    config: VmConfig, *, ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
) -> FirecrackerProcess:
    """Start ``config`` unjailed (development mode); return it configured, not booted."""
    if config.sandbox_required():
        raise ConfigError(
            f"VM {config.vm_id}: a sandbox is required (require_sandbox / "
            "IRONCLAW_REQUIRE_SANDBOX=1), so it cannot be started without the jailer: drop "
            "--no-jailer or the requirement"
        )
    if config.enable_networking:
        raise ConfigError(
            f"VM {config.vm_id}: enable_networking needs the jailer (the tap lives in the VM's "
            "own network namespace): drop --no-jailer or disable networking"
        )
    check_source(Path(config.kernel_path), "kernel_path")
    if config.rootfs_path is not None:
        check_source(Path(config.rootfs_path), "rootfs_path")
    log.warning(
        "VM %s runs UNSANDBOXED (development mode, insecure): started without the jailer on "
        "request; no chroot, no cgroup limits, no privilege drop",
        config.vm_id,
    )
    vm = FirecrackerProcess(config, await start_unjailed(config, ready_timeout_s=ready_timeout_s))
    try:
        await configure_vm(vm)
    except BaseException:
        await vm.stop()
        raise
    return vm
