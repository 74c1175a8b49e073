"""The host agent's HTTP+JSON API (FastAPI), a thin layer over :class:`.agent.HostAgent`.

Resources (all under ``/v1``; OpenAPI at ``/openapi.json``)::

    POST   /v1/vms[?start=true]    define a VM from a VmConfig (JSON), or start it at once
    POST   /v1/vms/{id}/start      start a defined VM
    GET    /v1/vms                 every VM on this host (running, starting, stale, defined)
    GET    /v1/vms/{id}            one VM
    GET    /v1/vms/{id}/stats      cgroup counters, console bytes dropped
    GET    /v1/vms/{id}/logs       console (or ?source=supervisor); ?follow=true streams
    POST   /v1/vms/{id}/exec       run a command through the guest agent, wait for its exit
    PUT    /v1/vms/{id}/files      upload the body to ?path= in the guest (&mode=0644)
    GET    /v1/vms/{id}/files      download ?path= from the guest
    DELETE /v1/vms/{id}            stop a VM (everything made for it is removed)
    POST   /v1/gc[?orphans=true]   collect VMs whose owner died
    GET    /v1/host                capacity, committed, health, version, labels

Errors are ``{"error": {"type", "message", "status", "reason"?}}`` with the status from
:func:`.errors.status_for`: one table, the library's own messages. Requests over TCP need
``Authorization: Bearer <token>`` (compared in constant time); the Unix socket is guarded
by its file mode (root only).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AgentRequestError, IronclawError
from ..vm import VmConfig
from ..vm.consoleread import ConsoleFollower
from .agent import HostAgent, agent_version
from .errors import AdmissionError, RequestError, status_for
from .guest import (
    ExecRequest,
    ExecResponse,
    TransferResponse,
    download,
    run_exec,
    transfer_file,
    upload,
    vsock_path,
)
from .models import ERROR_RESPONSES, HostInfo, StopResult, VmInfo

__all__ = ["create_app"]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: How often a followed log checks whether its VM still exists.
FOLLOW_POLL_S = 0.1
LOG_CHUNK = 64 * 1024
#: Uploads stream to a file under their own, larger limit instead of being buffered.
UPLOAD_PATH = re.compile(r"^/v1/vms/[^/]+/files$")


def error_body(exc: IronclawError) -> dict[str, Any]:
    status = status_for(exc)
    err: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc), "status": status}
    if isinstance(exc, AdmissionError):
        err["reason"] = exc.reason
    elif isinstance(exc, AgentRequestError):
        err["reason"] = exc.code
    return {"error": err}


def error_response(exc: IronclawError) -> JSONResponse:
    headers = {}
    if isinstance(exc, AdmissionError) and exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if isinstance(exc, RequestError) and exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc), status_code=status_for(exc), headers=headers)


class Guard:
    """ASGI middleware: bearer token on TCP listeners, and a bound on request bodies.

    A Unix-socket connection has ``scope["server"] == (path, None)``; a TCP one has a port.
    The body limit applies to the declared ``Content-Length`` and to what actually arrives
    (chunked bodies), so a client cannot make the agent buffer more than the limit.
    """

    def __init__(
        self, app: ASGIApp, *, token: bytes | None, max_body_bytes: int, max_file_bytes: int
    ) -> None:
        self.app = app
        self.expected = b"Bearer " + token if token is not None else None
        self.max_body = max_body_bytes
        self.max_file = max_file_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        server = scope.get("server")
        if server is None or server[1] is not None:  # TCP (or unknown): token required
            if self.expected is None:
                await self._reject(scope, send, RequestError("TCP access is disabled", 403))
                return
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "a wrong bearer token" if given else "no bearer token"
                await self._reject(
                    scope,
                    send,
                    RequestError(
                        f"unauthorized: the request carried {what}; send 'Authorization: "
                        "Bearer <the token in the agent's --token-file>'",
                        401,
                    ),
                )
                return
        upload = scope.get("method") == "PUT" and UPLOAD_PATH.match(scope.get("path", ""))
        limit = self.max_file if upload else self.max_body
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._reject(scope, send, self._too_large(limit))
            return
        if upload:  # the route streams it to a file, counting against max_file_bytes
            await self.app(scope, receive, send)
            return
        # Read the whole body first (it is small), counting what actually arrives: a
        # chunked body has no Content-Length to check.
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                await self._reject(scope, send, self._too_large(self.max_body))
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _too_large(limit: int) -> RequestError:
        return RequestError(f"request body too large: at most {limit} bytes", 413)

    @staticmethod
    async def _reject(scope: Scope, send: Send, exc: RequestError) -> None:
        response = error_response(exc)

        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        await response(scope, no_body, send)


def _config_schema_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """OpenAPI with the VmConfig schema as the POST /v1/vms body (we parse it ourselves)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            defs = VmConfig.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.pop("$defs", {}))
            components["VmConfig"] = defs
            op = schema["paths"]["/v1/vms"]["post"]
            op["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/VmConfig"}}
                },
            }
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


async def _json_body(request: Request) -> object:
    raw = await request.body()
    if not raw:
        raise RequestError("the request body is empty: send a VmConfig as JSON")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None


def create_app(agent: HostAgent, *, token: bytes | None = None) -> ASGIApp:
    """The agent's ASGI application (FastAPI routes wrapped in :class:`Guard`)."""
    app = FastAPI(
        title="ironclaw host agent",
        version=agent_version(),
        description="One host's Firecracker microVMs, each jailed and owned by a supervisor.",
        docs_url=None,
        redoc_url=None,
        responses=ERROR_RESPONSES,
    )

    @app.exception_handler(IronclawError)
    async def _ironclaw(request: Request, exc: IronclawError) -> JSONResponse:
        if status_for(exc) >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()))
            lines.append(f"  {loc}: {err.get('msg', 'invalid')}")
        return error_response(RequestError("invalid request:\n" + "\n".join(lines), 422))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such resource: {request.method} {request.url.path} (see /openapi.json)"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(RequestError(message, exc.status_code))

    @app.post(
        "/v1/vms",
        status_code=201,
        response_model=VmInfo,
        summary="Define a VM, or start it with ?start=true",
    )
    async def create_vm(
        request: Request, start: Annotated[bool, Query(description="Boot it now.")] = False
    ) -> dict[str, Any]:
        return await agent.create(await _json_body(request), start=start)

    @app.post("/v1/vms/{vm_id}/start", response_model=VmInfo, summary="Start a defined VM")
    async def start_vm(vm_id: str) -> dict[str, Any]:
        return await agent.start_defined(vm_id)

    @app.get("/v1/vms", response_model=list[VmInfo], summary="List the VMs on this host")
    async def list_vms() -> list[dict[str, Any]]:
        return await asyncio.to_thread(agent.list)

    @app.get("/v1/vms/{vm_id}", response_model=VmInfo, summary="One VM")
    async def get_vm(vm_id: str) -> dict[str, Any]:
        return agent.get(vm_id)

    @app.get("/v1/vms/{vm_id}/stats", summary="A VM's cgroup counters")
    async def vm_stats(vm_id: str) -> dict[str, Any]:
        return await agent.stats(vm_id)

    @app.get("/v1/vms/{vm_id}/logs", summary="A VM's console or supervisor log (streamed)")
    async def vm_logs(
        vm_id: str,
        follow: bool = False,
        source: Literal["console", "supervisor"] = "console",
    ) -> StreamingResponse:
        path = agent.log_path(vm_id, source)
        return StreamingResponse(
            _stream_log(agent, vm_id, path, follow), media_type="text/plain; charset=utf-8"
        )

    @app.post(
        "/v1/vms/{vm_id}/exec",
        response_model=ExecResponse,
        summary="Run a command in the VM through its guest agent and wait for it",
    )
    async def exec_in_vm(vm_id: str, req: ExecRequest) -> ExecResponse:
        return await run_exec(agent.record(vm_id), req)

    @app.put(
        "/v1/vms/{vm_id}/files",
        response_model=TransferResponse,
        summary="Upload the request body to a file in the guest (atomic, SHA-256 verified)",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        },
    )
    async def put_file(
        vm_id: str,
        request: Request,
        path: Annotated[str, Query(description="Absolute path in the guest.")],
        mode: Annotated[str | None, Query(pattern=r"^[0-7]{3,4}$", description="Octal.")] = None,
    ) -> TransferResponse:
        record = agent.record(vm_id)
        vsock_path(record)  # no vsock device: refuse before taking the body
        limit = agent.settings.max_file_bytes
        local = transfer_file(agent.settings.run_dir / "transfers")
        try:
            size = 0
            with local.open("wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(f"file too large: at most {limit} bytes", 413)
                    f.write(chunk)
            return await upload(record, local, path, None if mode is None else int(mode, 8))
        finally:
            local.unlink(missing_ok=True)

    @app.get(
        "/v1/vms/{vm_id}/files",
        response_class=FileResponse,
        responses={200: {"content": {"application/octet-stream": {}}}},
        summary="Download a file from the guest (SHA-256 verified)",
    )
    async def get_file(
        vm_id: str, path: Annotated[str, Query(description="Absolute path in the guest.")]
    ) -> FileResponse:
        record = agent.record(vm_id)
        vsock_path(record)
        local = transfer_file(agent.settings.run_dir / "transfers")
        await download(record, path, local, agent.settings.max_file_bytes)
        return FileResponse(
            local,
            media_type="application/octet-stream",
            background=BackgroundTask(local.unlink, missing_ok=True),
        )

    @app.delete(
        "/v1/vms/{vm_id}",
        response_model=StopResult,
        summary="Stop a VM and remove everything made for it",
    )
    async def delete_vm(vm_id: str) -> dict[str, Any]:
        return await agent.stop(vm_id)

    @app.post("/v1/gc", summary="Collect VMs whose owner died")
    async def gc(orphans: bool = False) -> dict[str, Any]:
        return await agent.gc(orphans=orphans)

    @app.get(
        "/v1/host",
        response_model=HostInfo,
        summary="Capacity, committed resources, health, version, labels",
    )
    async def host() -> dict[str, Any]:
        return await asyncio.to_thread(agent.host_info)

    app.openapi = _config_schema_openapi(app)  # type: ignore[method-assign]
    return Guard(
        app,
        token=token,
        max_body_bytes=agent.settings.max_body_bytes,
        max_file_bytes=agent.settings.max_file_bytes,
    )


async def _stream_log(
    agent: HostAgent, vm_id: str, path: Path, follow: bool
) -> AsyncIterator[bytes]:
    """The file's bytes; with ``follow``, new bytes until the VM's record is gone.

    A console is read from ``console.log.1`` on and followed across rotations.
    """
    reader = ConsoleFollower(path)
    try:
        while True:
            chunk = reader.read(LOG_CHUNK)
            if chunk:
                yield chunk
                continue
            if not follow or agent.registry.get(vm_id) is None:
                while rest := reader.read(LOG_CHUNK):
                    yield rest
                return
            await asyncio.sleep(FOLLOW_POLL_S)
    finally:
        reader.close()
