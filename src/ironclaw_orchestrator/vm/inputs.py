"""Check a ``VmConfig`` against the host before anything is spawned, recorded or made.

``VmConfig`` validation is pure (types, ranges, syntax). What needs the host is checked
here, once, by both ``start_firecracker`` and ``ironclaw vm start`` (before it spawns a
supervisor): the kernel and rootfs exist, are regular, readable and (with ``image_dirs`` /
``IRONCLAW_IMAGE_DIRS``) inside the allowed directories; guest memory fits the host's RAM;
a configured netns path is a network namespace; an uplink subnet overlaps no host route.
Every failure is a ``ConfigError`` naming the key.
"""

from __future__ import annotations

from pathlib import Path

from .config import VmConfig
from .hostcheck import check_guest_memory, check_netns_path, check_uplink_routes
from .staging import check_source

__all__ = ["check_vm_inputs"]


def check_vm_inputs(config: VmConfig) -> None:
    """Refuse ``config`` if the host says it cannot work; read-only, quick."""
    jailer = config.jailer_config()
    check_source(Path(config.kernel_path), "kernel_path", jailer.image_dirs)
    if config.rootfs_path is not None:
        check_source(Path(config.rootfs_path), "rootfs_path", jailer.image_dirs)
    check_guest_memory(config.memory_mb)
    if jailer.netns is not None:
        check_netns_path(jailer.netns)
    if config.uplink_subnet is not None:
        check_uplink_routes(config.uplink_subnet)
