"""An asyncio client of one host agent (``ironclaw serve``), over its Unix socket or TCP.

Errors come back as the library's own exception classes, rebuilt from the agent's
``{"error": {"type", "message"}}`` body, so ``except HostFullError`` works across the wire.
An agent that does not answer at all is :class:`HostAgentUnreachableError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors as errors_mod
from ..errors import IronclawError
from ..server import errors as server_errors
from ..server.errors import AdmissionError, RequestError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "AGENT_SOCKET_ENV",
    "AGENT_TOKEN_FILE_ENV",
    "AGENT_URL_ENV",
    "HostAgentClient",
    "HostAgentUnreachableError",
    "error_from_body",
]

#: Where the Ray actor on a node finds that node's agent (set in the environment of
#: ``ray start`` on the node); default: the agent's default socket.
AGENT_SOCKET_ENV = "IRONCLAW_AGENT_SOCKET"
AGENT_URL_ENV = "IRONCLAW_AGENT_URL"
AGENT_TOKEN_FILE_ENV = "IRONCLAW_AGENT_TOKEN_FILE"
DEFAULT_TIMEOUT_S = 90.0


class HostAgentUnreachableError(IronclawError):
    """The host agent did not answer (socket gone, connection refused, timed out)."""


def error_from_body(status: int, body: object) -> IronclawError:
    """The exception an agent's error response stands for (same class where we know it)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return IronclawError(f"host agent answered HTTP {status}: {str(body)[:500]}")
    message = str(err.get("message") or f"HTTP {status}")
    name = str(err.get("type", ""))
    cls = getattr(server_errors, name, None) or getattr(errors_mod, name, None)
    if isinstance(cls, type) and issubclass(cls, AdmissionError):
        return cls(message)
    if cls is RequestError:
        return RequestError(message, status)
    if cls is errors_mod.AgentRequestError:
        return errors_mod.AgentRequestError(message, code=str(err.get("reason") or "error"))
    if isinstance(cls, type) and issubclass(cls, IronclawError):
        try:
            return cls(message)
        except TypeError:
            pass
    return IronclawError(message)


class HostAgentClient:
    """Talks to one host agent. Give ``socket_path``, or ``url`` (+ ``token``)."""

    def __init__(
        self,
        *,
        socket_path: Path | str | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if (socket_path is None) == (url is None):
            raise errors_mod.ConfigError("give the agent's socket_path or its url (not both)")
        import httpx  # here, not at import: httpx pulls in rich and click when they are installed

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http: httpx.AsyncClient
        if socket_path is not None:
            self.where = str(socket_path)
            transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
            self._http = httpx.AsyncClient(
                transport=transport, base_url="http://agent", timeout=timeout_s, headers=headers
            )
        else:
            self.where = str(url)
            self._http = httpx.AsyncClient(base_url=str(url), timeout=timeout_s, headers=headers)

    @classmethod
    def from_env(cls, timeout_s: float = DEFAULT_TIMEOUT_S) -> HostAgentClient:
        """The agent named by ``IRONCLAW_AGENT_URL`` (+ token file) or ``..._SOCKET``."""
        from ..server.settings import DEFAULT_SOCKET

        url = os.environ.get(AGENT_URL_ENV)
        if url:
            token_file = os.environ.get(AGENT_TOKEN_FILE_ENV)
            token = Path(token_file).read_text().strip() if token_file else None
            return cls(url=url, token=token, timeout_s=timeout_s)
        return cls(
            socket_path=os.environ.get(AGENT_SOCKET_ENV) or DEFAULT_SOCKET, timeout_s=timeout_s
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        import httpx

        try:
            response = await self._http.request(method, path, json=json, params=params)
        except httpx.TransportError as exc:
            raise HostAgentUnreachableError(
                f"host agent at {self.where} did not answer {method} {path}: "
                f"{type(exc).__name__}: {exc}; is `ironclaw serve` running there?"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.is_error:
            raise error_from_body(response.status_code, body)
        return body

    async def host(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/host")
        return result

    async def create(self, config: dict[str, Any], *, start: bool = True) -> dict[str, Any]:
        params = {"start": "true"} if start else None
        result: dict[str, Any] = await self.request("POST", "/v1/vms", json=config, params=params)
        return result

    async def list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", "/v1/vms")
        return result

    async def get(self, vm_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/vms/{vm_id}")
        return result

    async def exec(self, vm_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/vms/{id}/exec``: run a command through the VM's guest agent."""
        result: dict[str, Any] = await self.request("POST", f"/v1/vms/{vm_id}/exec", json=request)
        return result

    async def stop(self, vm_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("DELETE", f"/v1/vms/{vm_id}")
        return result
