"""The pre-boot configuration requests, built as data (method, path, body), so that a start
can send them pipelined in one write (:meth:`.api.FirecrackerApi.request_all`) and the typed
helpers of :class:`.api.FirecrackerApi` send the very same bodies one at a time.

Every path handed to Firecracker is as the VMM sees it: jail-relative when jailed.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from .ratelimit import RateLimit

__all__ = [
    "Call",
    "boot_source",
    "drive",
    "drive_body",
    "machine_config",
    "network_interface",
    "vsock",
]

#: One request: method, path and JSON body (``None``: no body).
Call = tuple[str, str, dict[str, Any] | None]


def machine_config(vcpu_count: int, mem_size_mib: int, *, track_dirty_pages: bool = False) -> Call:
    # smt (was ht_enabled in v1.0) defaults to false in every version; leave it out.
    body: dict[str, Any] = {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib}
    if track_dirty_pages:  # same field name from v1.0 to v1.14; default false
        body["track_dirty_pages"] = True
    return "PUT", "/machine-config", body


def boot_source(kernel: PurePosixPath | Path, boot_args: str) -> Call:
    return "PUT", "/boot-source", {"kernel_image_path": str(kernel), "boot_args": boot_args}


def drive(
    drive_id: str,
    path: PurePosixPath | Path,
    *,
    root: bool,
    read_only: bool,
    rate_limit: RateLimit | None = None,
) -> Call:
    body = drive_body(drive_id, path, root=root, read_only=read_only, rate_limit=rate_limit)
    return "PUT", f"/drives/{drive_id}", body


def drive_body(
    drive_id: str,
    path: PurePosixPath | Path,
    *,
    root: bool,
    read_only: bool,
    rate_limit: RateLimit | None = None,
) -> dict[str, Any]:
    """``PUT /drives/{id}`` body: v1.0 requires both booleans; later releases accept them."""
    body: dict[str, Any] = {
        "drive_id": drive_id,
        "path_on_host": str(path),
        "is_root_device": root,
        "is_read_only": read_only,
    }
    if rate_limit is not None and not rate_limit.unlimited:
        body["rate_limiter"] = rate_limit.to_api()
    return body


def network_interface(
    iface_id: str,
    host_dev_name: str,
    guest_mac: str,
    *,
    rx_rate_limit: RateLimit | None = None,
    tx_rate_limit: RateLimit | None = None,
) -> Call:
    body: dict[str, Any] = {
        "iface_id": iface_id, "host_dev_name": host_dev_name, "guest_mac": guest_mac
    }  # fmt: skip
    if rx_rate_limit is not None and not rx_rate_limit.unlimited:
        body["rx_rate_limiter"] = rx_rate_limit.to_api()
    if tx_rate_limit is not None and not tx_rate_limit.unlimited:
        body["tx_rate_limiter"] = tx_rate_limit.to_api()
    return "PUT", f"/network-interfaces/{iface_id}", body


def vsock(guest_cid: int, uds_path: PurePosixPath | Path) -> Call:
    # No vsock_id: deprecated in every release's API spec (v1.0.0 accepts a body without
    # it, checked against the real binary in tests/integration/test_api_bodies_real.py).
    return "PUT", "/vsock", {"guest_cid": guest_cid, "uds_path": str(uds_path)}
