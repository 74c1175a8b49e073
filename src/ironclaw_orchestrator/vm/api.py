"""Firecracker's HTTP API over its Unix socket (httpx), with errors translated once here.

Every path handed to Firecracker is as the VMM sees it: jail-relative when jailed.
One client (one keep-alive connection) per VM: Firecracker serves only a few connections.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from ..errors import ApiError

#: Default per-request timeout; InstanceStart on a large guest can take a while.
DEFAULT_TIMEOUT_S = 10.0


class FirecrackerApi:
    """Async client for one Firecracker API socket."""

    def __init__(
        self, socket_path: Path, *, vm_id: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.socket_path = socket_path
        self.vm_id = vm_id
        # Plain HTTP over a Unix socket: no TLS, so skip building an SSL context (which
        # costs tens of milliseconds, more than firecracker's own start-up).
        self._client = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path), verify=False),
            base_url="http://localhost",
            timeout=timeout_s,
            verify=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> FirecrackerApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON body (or ``None``); raise ``ApiError``."""
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        try:
            resp = await self._client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiError(
                f"VM {self.vm_id}: {method} {path} timed out on {self.socket_path}; the VMM is "
                "busy or hung: check its console log",
                vm_id=self.vm_id,
            ) from exc
        except httpx.TransportError as exc:
            raise ApiError(
                f"VM {self.vm_id}: cannot reach the API socket {self.socket_path} for "
                f"{method} {path}: {exc}; the VMM may have exited (see its console log)",
                vm_id=self.vm_id,
            ) from exc
        if resp.status_code >= 400:
            fault = _fault(resp)
            raise ApiError(
                f"VM {self.vm_id}: Firecracker rejected {method} {path} "
                f"({resp.status_code}): {fault}",
                vm_id=self.vm_id,
                status_code=resp.status_code,
                fault_message=fault,
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            return resp.text

    # Typed helpers for the calls the orchestrator makes. ---------------------------------

    async def describe(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /``: instance info; answering at all means the API is ready."""
        result = await self.request("GET", "/", timeout_s=timeout_s)
        return result if isinstance(result, dict) else {}

    async def put_machine_config(self, vcpu_count: int, mem_size_mib: int) -> None:
        # smt (was ht_enabled in v1.0) defaults to false in every version; leave it out.
        await self.request(
            "PUT", "/machine-config", {"vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib}
        )

    async def put_boot_source(self, kernel: PurePosixPath | Path, boot_args: str) -> None:
        await self.request(
            "PUT", "/boot-source", {"kernel_image_path": str(kernel), "boot_args": boot_args}
        )

    async def put_drive(
        self, drive_id: str, path: PurePosixPath | Path, *, root: bool, read_only: bool
    ) -> None:
        await self.request(
            "PUT",
            f"/drives/{drive_id}",
            {
                "drive_id": drive_id,
                "path_on_host": str(path),
                "is_root_device": root,
                "is_read_only": read_only,
            },
        )

    async def put_network_interface(
        self, iface_id: str, host_dev_name: str, guest_mac: str
    ) -> None:
        await self.request(
            "PUT",
            f"/network-interfaces/{iface_id}",
            {"iface_id": iface_id, "host_dev_name": host_dev_name, "guest_mac": guest_mac},
        )

    async def put_vsock(self, guest_cid: int, uds_path: PurePosixPath | Path) -> None:
        # v1.0 requires vsock_id; later versions ignore it.
        await self.request(
            "PUT",
            "/vsock",
            {"vsock_id": "vsock0", "guest_cid": guest_cid, "uds_path": str(uds_path)},
        )

    async def instance_start(self) -> None:
        await self.request("PUT", "/actions", {"action_type": "InstanceStart"})

    async def send_ctrl_alt_del(self) -> None:
        await self.request("PUT", "/actions", {"action_type": "SendCtrlAltDel"})

    async def pause(self) -> None:
        await self.request("PATCH", "/vm", {"state": "Paused"})

    async def resume(self) -> None:
        await self.request("PATCH", "/vm", {"state": "Resumed"})


def _fault(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip() or resp.reason_phrase
    if isinstance(data, dict) and "fault_message" in data:
        return str(data["fault_message"])
    return str(data)
