"""Firecracker's HTTP API over its Unix socket, with errors translated once here.

Every path handed to Firecracker is as the VMM sees it: jail-relative when jailed.
One client (one keep-alive connection) per VM: Firecracker serves only a few connections.

Responses are parsed by httptools (MagicStack's binding of llhttp, Node.js's C parser; the
one uvicorn uses) fed straight from an asyncio Protocol on the Unix socket. A request is one
line and a few fixed headers, formatted here, its target checked so that nothing can end
the line early. The per-VM API CPU is what limits how many VMs a small host starts per
second; measured on a real firecracker v1.0 socket, one connection plus four requests cost
~0.65 ms CPU through h11 on asyncio streams (~0.6 with h11 on a Protocol: h11's event
objects and header validation are most of it), ~0.3 ms this way, and ~4 ms through httpx.
Several requests can go in one write (``request_all``): Firecracker answers pipelined
requests in order, so a start's configuration costs the event loop one wake-up, not one
per request (each ~0.1 ms CPU on a virtualised host).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import httptools

from ..errors import ApiError, UsageError
from . import api_calls as calls
from .api_calls import Call, drive_body
from .ratelimit import RateLimit

__all__ = ["DEFAULT_TIMEOUT_S", "Call", "FirecrackerApi", "drive_body"]

#: Default per-request timeout; InstanceStart on a large guest can take a while.
DEFAULT_TIMEOUT_S = 10.0
#: A request target: a path of printable ASCII without spaces (so it cannot end the line).
_TARGET = re.compile(r"/[!-~]*")
_METHODS = frozenset({"GET", "PUT", "PATCH"})
_HEAD = " HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"


#: One response: status, reason phrase and body.
_Response = tuple[int, bytes, bytes]


class _Dropped(Exception):
    """The server closed a reused keep-alive connection before answering: safe to resend."""


class _Link(asyncio.Protocol):
    """One keep-alive connection: what arrives is parsed as it arrives; the waiting caller is
    woken once all the responses it expects are complete (or cannot be)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.expected = 0
        self.responses: list[_Response] = []
        self.closed = False
        self.received = False  # a byte of the current exchange has arrived
        self.reason = b""
        self.body = b""
        self.keep_alive = True
        self.on_first: Callable[[], object] | None = None

    def begin(
        self,
        waiter: asyncio.Future[None],
        expected: int,
        on_first: Callable[[], object] | None = None,
    ) -> None:
        self.waiter, self.expected, self.responses = waiter, expected, []
        self.received, self.reason, self.body = False, b"", b""
        self.on_first = on_first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._wake(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake(exc or EOFError("the API server closed the connection"))

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.responses.append((self.parser.get_status_code(), self.reason, self.body))
        self.reason, self.body = b"", b""
        if len(self.responses) >= self.expected:
            self._wake(None)
        elif len(self.responses) == 1 and self.on_first is not None:
            self.on_first()

    def _wake(self, error: BaseException | None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class FirecrackerApi:
    """Async client for one Firecracker API socket."""

    def __init__(
        self, socket_path: Path, *, vm_id: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.socket_path = socket_path
        self.vm_id = vm_id
        self.timeout_s = timeout_s
        self._link: _Link | None = None
        self._lock = asyncio.Lock()  # one exchange at a time on the one connection

    async def aclose(self) -> None:
        self._drop()

    async def __aenter__(self) -> FirecrackerApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _drop(self) -> None:
        if self._link is not None:
            self._link.close()
        self._link = None

    async def _connect(self) -> _Link:
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(_Link, str(self.socket_path))
        return link

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON body (or ``None``); raise ``ApiError``."""
        (result,) = await self.request_all([(method, path, body)], timeout_s=timeout_s)
        return result

    async def request_all(
        self,
        calls: Sequence[Call],
        *,
        timeout_s: float | None = None,
        first_timeout_s: float | None = None,
    ) -> list[Any]:
        """Send ``calls`` pipelined (one write, one wake-up for all the answers); return each
        decoded body. Firecracker serves them in order, each whatever became of the others:
        the first it rejected raises ``ApiError`` once all are answered.

        ``first_timeout_s`` bounds the wait for the first answer only (a readiness probe):
        once it has come, the rest get ``timeout_s`` (default: the client's), as if sent
        one by one."""
        if not calls:
            return []
        message = b"".join(self._encode(method, path, body) for method, path, body in calls)
        rest_s = self.timeout_s if timeout_s is None else timeout_s
        async with self._lock:
            try:
                async with asyncio.timeout(
                    rest_s if first_timeout_s is None else first_timeout_s
                ) as budget:
                    on_first = None
                    if first_timeout_s is not None and len(calls) > 1:
                        loop = asyncio.get_running_loop()

                        def on_first() -> None:
                            budget.reschedule(loop.time() + rest_s)

                    try:
                        responses = await self._exchange(message, len(calls), on_first)
                    except _Dropped:
                        self._drop()
                        responses = await self._exchange(message, len(calls), on_first)
            except TimeoutError as exc:
                raise ApiError(
                    f"VM {self.vm_id}: {_names(calls)} timed out on {self.socket_path}; the "
                    "VMM is busy or hung: check its console log",
                    vm_id=self.vm_id,
                ) from exc
            except (OSError, EOFError, _Dropped, httptools.HttpParserError) as exc:
                raise ApiError(
                    f"VM {self.vm_id}: cannot reach the API socket {self.socket_path} for "
                    f"{_names(calls)}: {exc or type(exc).__name__}; the VMM may have exited "
                    "(see its console log)",
                    vm_id=self.vm_id,
                ) from exc
        results = []
        for (method, path, _), (status, reason, data) in zip(calls, responses, strict=True):
            if status >= 400:
                fault = _fault(data, reason.decode(errors="replace"))
                raise ApiError(
                    f"VM {self.vm_id}: Firecracker rejected {method} {path} ({status}): {fault}",
                    vm_id=self.vm_id,
                    status_code=status,
                    fault_message=fault,
                )
            results.append(_decode(data))
        return results

    def _encode(self, method: str, path: str, body: dict[str, Any] | None) -> bytes:
        if method not in _METHODS or not _TARGET.fullmatch(path):
            raise UsageError(
                f"VM {self.vm_id}: not an API request: {method!r} {path!r}: the method must be "
                "GET, PUT or PATCH and the path printable ASCII without spaces (check the "
                "drive or interface id in it)"
            )
        if body is None:
            return f"{method} {path}{_HEAD}\r\n".encode()
        payload = json.dumps(body).encode()
        return (
            f"{method} {path}{_HEAD}Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload

    async def _exchange(
        self, message: bytes, expected: int, on_first: Callable[[], object] | None = None
    ) -> list[_Response]:
        """Send ``message`` (``expected`` requests); return their responses, in order.

        Whatever ends this early (an error, a timeout, a cancellation) drops the connection:
        a response still on its way would otherwise be taken for the next request's.
        """
        link = self._link
        reused = link is not None and not link.closed
        if link is None or not reused:
            self._drop()
            link = self._link = await self._connect()
        waiter = asyncio.get_running_loop().create_future()
        link.begin(waiter, expected, on_first)
        done = False
        try:
            assert link.transport is not None
            link.transport.write(message)
            try:
                await waiter
            except (OSError, EOFError) as exc:
                if reused and not link.received:
                    raise _Dropped(str(exc) or type(exc).__name__) from exc
                raise
            done = True
        finally:
            if not done or not link.keep_alive:
                self._drop()  # the server asked to close: reconnect on the next request
        return link.responses

    # Typed helpers for the calls the orchestrator makes. ---------------------------------

    async def describe(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /``: instance info; answering at all means the API is ready."""
        result = await self.request("GET", "/", timeout_s=timeout_s)
        return result if isinstance(result, dict) else {}

    async def put_machine_config(
        self, vcpu_count: int, mem_size_mib: int, *, track_dirty_pages: bool = False
    ) -> None:
        await self.request(
            *calls.machine_config(vcpu_count, mem_size_mib, track_dirty_pages=track_dirty_pages)
        )

    async def put_boot_source(self, kernel: PurePosixPath | Path, boot_args: str) -> None:
        await self.request(*calls.boot_source(kernel, boot_args))

    async def put_drive(
        self,
        drive_id: str,
        path: PurePosixPath | Path,
        *,
        root: bool,
        read_only: bool,
        rate_limit: RateLimit | None = None,
    ) -> None:
        await self.request(*calls.drive(
            drive_id, path, root=root, read_only=read_only, rate_limit=rate_limit
        ))  # fmt: skip

    async def put_network_interface(
        self,
        iface_id: str,
        host_dev_name: str,
        guest_mac: str,
        *,
        rx_rate_limit: RateLimit | None = None,
        tx_rate_limit: RateLimit | None = None,
    ) -> None:
        await self.request(*calls.network_interface(
            iface_id, host_dev_name, guest_mac,
            rx_rate_limit=rx_rate_limit, tx_rate_limit=tx_rate_limit,
        ))  # fmt: skip

    async def patch_drive_rate_limit(self, drive_id: str, rate_limit: RateLimit) -> None:
        """Replace a drive's limiter on a running VM (``PATCH /drives/{id}``, post-boot only)."""
        await self.request(
            "PATCH",
            f"/drives/{drive_id}",
            {"drive_id": drive_id, "rate_limiter": rate_limit.to_api_update()},
        )

    async def patch_network_rate_limits(
        self, iface_id: str, *, rx: RateLimit | None = None, tx: RateLimit | None = None
    ) -> None:
        """Replace rx and/or tx limiters on a running VM (``PATCH /network-interfaces/{id}``)."""
        body: dict[str, Any] = {"iface_id": iface_id}
        if rx is not None:
            body["rx_rate_limiter"] = rx.to_api_update()
        if tx is not None:
            body["tx_rate_limiter"] = tx.to_api_update()
        await self.request("PATCH", f"/network-interfaces/{iface_id}", body)

    async def put_metrics(self, metrics_path: PurePosixPath | Path) -> None:
        """``PUT /metrics``: up to v1.13 the file must exist first (create it in the jail)."""
        await self.request("PUT", "/metrics", {"metrics_path": str(metrics_path)})

    async def flush_metrics(self) -> None:
        await self.request("PUT", "/actions", {"action_type": "FlushMetrics"})

    async def get_vm_config(self) -> dict[str, Any]:
        """``GET /vm/config``: the configuration Firecracker holds (v1.0 and later)."""
        result = await self.request("GET", "/vm/config")
        return result if isinstance(result, dict) else {}

    async def put_vsock(self, guest_cid: int, uds_path: PurePosixPath | Path) -> None:
        await self.request(*calls.vsock(guest_cid, uds_path))

    async def instance_start(self) -> None:
        await self.request("PUT", "/actions", {"action_type": "InstanceStart"})

    async def send_ctrl_alt_del(self) -> None:
        await self.request("PUT", "/actions", {"action_type": "SendCtrlAltDel"})

    async def pause(self) -> None:
        await self.request("PATCH", "/vm", {"state": "Paused"})

    async def resume(self) -> None:
        await self.request("PATCH", "/vm", {"state": "Resumed"})

    # Snapshots: bodies differ by version, see ``snapshot_api``. Writing or mapping guest
    # memory can take much longer than the default timeout on a big guest.

    async def create_snapshot(self, body: dict[str, Any], *, timeout_s: float = 300.0) -> None:
        await self.request("PUT", "/snapshot/create", body, timeout_s=timeout_s)

    async def load_snapshot(self, body: dict[str, Any], *, timeout_s: float = 60.0) -> None:
        await self.request("PUT", "/snapshot/load", body, timeout_s=timeout_s)


def _fault(data: bytes, reason: str) -> str:
    try:
        parsed = json.loads(data)
    except ValueError:
        return data.decode(errors="replace").strip() or reason
    if isinstance(parsed, dict) and "fault_message" in parsed:
        return str(parsed["fault_message"])
    return str(parsed)


def _decode(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")


def _names(calls: Sequence[Call]) -> str:
    return ", ".join(f"{method} {path}" for method, path, _ in calls)
