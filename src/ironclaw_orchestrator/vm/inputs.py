"""Check a ``VmConfig`` against the host before anything is spawned, recorded or made.

``VmConfig`` validation is pure (types, ranges, syntax). What needs the host is checked
here, once, by both ``start_firecracker`` and ``ironclaw vm start`` (before it spawns a
supervisor): the kernel and rootfs exist, are regular, readable and (with ``image_dirs`` /
``IRONCLAW_IMAGE_DIRS``) inside the allowed directories; guest memory fits the host's RAM;
a configured netns path is a network namespace; an uplink subnet overlaps no host route;
when the VM will be jailed, its API (and vsock) socket paths fit a Unix socket address.
Every failure is a ``ConfigError`` naming the key.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BinaryNotFoundError, ConfigError
from .binaries import find_firecracker
from .config import JailerConfig, VmConfig
from .hostcheck import (
    check_guest_memory,
    check_netns_path,
    check_socket_budget,
    check_uplink_routes,
    is_root,
)
from .staging import check_source

__all__ = ["check_vm_inputs"]


def check_vm_inputs(
    config: VmConfig, *, jailed: bool = True, jailer: JailerConfig | None = None
) -> JailerConfig:
    """Refuse ``config`` if the host says it cannot work; read-only, quick, spawns nothing.

    ``jailed=False``: the caller asked for an unjailed VM (no jail paths to check).
    ``jailer``: ``config.jailer_config()`` if the caller has it already (it is not changed).

    Returns the jailer config the checks used: when the jail's paths were checked, a copy
    whose ``exec_file`` is the firecracker binary found and whose jail paths are derived
    (a start passes it on instead of finding and deriving them again); else ``jailer``.
    """
    if jailer is None:
        jailer = config.jailer_config()
    check_source(Path(config.kernel_path), "kernel_path", jailer.image_dirs)
    if config.rootfs_path is not None:
        check_source(Path(config.rootfs_path), "rootfs_path", jailer.image_dirs)
    check_guest_memory(config.memory_mb)
    if jailer.netns is not None:
        check_netns_path(jailer.netns)
    if config.uplink_subnet is not None:
        check_uplink_routes(config.uplink_subnet)
    if jailed and is_root():
        return _check_socket_paths(config, jailer)
    return jailer


def _check_socket_paths(config: VmConfig, jailer: JailerConfig) -> JailerConfig:
    """The jail's socket paths fit 107 bytes (computed as the jailer will lay them out)."""
    explicit = jailer.exec_file if "exec_file" in jailer.model_fields_set else None
    try:
        exec_file = find_firecracker(explicit)
    except BinaryNotFoundError:
        return jailer  # start-up decides: unjailed fallback, or a clear error
    jail = jailer.with_exec_file(exec_file)
    try:
        check_socket_budget(jail.api_socket_path)
        if config.vsock_guest_cid is not None:
            vsock = jail.chroot_dir / str(config.vsock_uds_path).lstrip("/")
            check_socket_budget(Path(f"{vsock}_4294967295"), "vsock socket (with _<port>)")
    except ConfigError as exc:
        raise ConfigError(
            f"vm_id {config.vm_id!r} with jailer.chroot_base_dir {jail.chroot_base_dir}: {exc}"
        ) from None
    return jail
