"""Request bodies of Firecracker's snapshot API, by version (pure: golden-tested).

What differs between releases (from Firecracker's CHANGELOG and swagger):

* ``PUT /snapshot/create``: ``snapshot_type`` (``Full``/``Diff``), ``snapshot_path``,
  ``mem_file_path`` in every version. v1.0..v1.5 also take ``version`` (the snapshot format
  to write, so an older Firecracker can load it); v1.6 removed it. We pin it to the running
  release where it exists, so the file says what wrote it.
* ``PUT /snapshot/load``: v1.0 takes ``mem_file_path`` (and ``enable_diff_snapshots``,
  ``resume_vm``); v1.1+ ``mem_backend {backend_type: File, backend_path}`` (``mem_file_path``
  deprecated); v1.13 renamed ``enable_diff_snapshots`` to ``track_dirty_pages``; v1.12 added
  ``network_overrides`` (tap renaming) and v1.16 ``vsock_override`` (socket path).
* Dirty-page tracking of a booted VM: ``PUT /machine-config`` ``track_dirty_pages`` (same
  name v1.0..v1.14). Diff snapshots need it before v1.14, which can use mincore(2) instead.

Every path is as the VMM sees it (jail-relative).
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from .binaries import Version

__all__ = ["create_body", "diff_needs_tracking", "load_body", "supports_overrides"]

_MEM_BACKEND = (1, 1, 0)
_NO_CREATE_VERSION = (1, 6, 0)
_NETWORK_OVERRIDES = (1, 12, 0)
_TRACK_DIRTY_PAGES = (1, 13, 0)
_VSOCK_OVERRIDE = (1, 16, 0)
#: From v1.14 a Diff snapshot of a VM without dirty-page tracking uses mincore(2) instead.
_DIFF_WITHOUT_TRACKING = (1, 14, 0)


def diff_needs_tracking(version: Version) -> bool:
    """Whether ``version`` refuses Diff snapshots of VMs that do not track dirty pages."""
    return version.release < _DIFF_WITHOUT_TRACKING


def create_body(
    version: Version, snapshot_path: PurePosixPath, mem_path: PurePosixPath, *, diff: bool
) -> dict[str, Any]:
    """Body of ``PUT /snapshot/create`` for Firecracker ``version``."""
    body: dict[str, Any] = {
        "snapshot_type": "Diff" if diff else "Full",
        "snapshot_path": str(snapshot_path),
        "mem_file_path": str(mem_path),
    }
    if version.release < _NO_CREATE_VERSION:
        body["version"] = f"{version.major}.{version.minor}.{version.patch}"
    return body


def supports_overrides(version: Version) -> dict[str, bool]:
    """Which load-time overrides ``version`` accepts."""
    return {
        "network_overrides": version.release >= _NETWORK_OVERRIDES,
        "vsock_override": version.release >= _VSOCK_OVERRIDE,
    }


def load_body(
    version: Version,
    snapshot_path: PurePosixPath,
    mem_path: PurePosixPath,
    *,
    resume: bool,
    track_dirty_pages: bool = False,
    network_overrides: dict[str, str] | None = None,
    vsock_uds_path: PurePosixPath | None = None,
) -> dict[str, Any]:
    """Body of ``PUT /snapshot/load`` for Firecracker ``version``.

    ``network_overrides`` maps interface id -> new tap name and ``vsock_uds_path`` moves the
    vsock socket; both are only sent to releases that accept them (older ones recreate the
    snapshot's own names, which is fine inside a fresh jail and network namespace). Asking
    for them on an older release raises ``ValueError``.
    """
    body: dict[str, Any] = {"snapshot_path": str(snapshot_path)}
    if version.release >= _MEM_BACKEND:
        body["mem_backend"] = {"backend_type": "File", "backend_path": str(mem_path)}
    else:
        body["mem_file_path"] = str(mem_path)
    if version.release >= _TRACK_DIRTY_PAGES:
        body["track_dirty_pages"] = track_dirty_pages
    else:
        body["enable_diff_snapshots"] = track_dirty_pages
    body["resume_vm"] = resume
    can = supports_overrides(version)
    if network_overrides:
        if not can["network_overrides"]:
            raise ValueError(f"Firecracker {version} cannot rename taps on load (v1.12+)")
        body["network_overrides"] = [
            {"iface_id": iface, "host_dev_name": tap} for iface, tap in network_overrides.items()
        ]
    if vsock_uds_path is not None:
        if not can["vsock_override"]:
            raise ValueError(f"Firecracker {version} cannot move the vsock socket on load (v1.16+)")
        body["vsock_override"] = {"uds_path": str(vsock_uds_path)}
    return body
