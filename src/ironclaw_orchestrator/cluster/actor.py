"""The Ray actor on each host node: a thin, stateless client of that node's host agent.

It holds no VM state (the agent and its registry do); it exists so that the cluster
client can reach every node's agent through Ray, pinned to the node it serves. Replies are
plain envelopes (``{"ok": True, "value": ...}`` or ``{"ok": False, "error": {...}}``) so
that errors cross Ray without pickling exception classes.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ..errors import AgentRequestError, IronclawError
from ..server.errors import AdmissionError
from .client import HostAgentClient

__all__ = ["HostActor", "envelope_error"]


def envelope_error(exc: IronclawError) -> dict[str, Any]:
    err: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, AdmissionError):
        err["reason"] = exc.reason
    elif isinstance(exc, AgentRequestError):
        err["reason"] = exc.code
    return {"ok": False, "error": err}


class HostActor:
    """Wrapped with ``ray.remote`` by :class:`~.cluster.Cluster`; one per host node."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.client = HostAgentClient.from_env()

    async def _call(self, coro: Any) -> dict[str, Any]:
        try:
            return {"ok": True, "value": await coro}
        except IronclawError as exc:
            return envelope_error(exc)

    async def whoami(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "hostname": socket.gethostname(), "pid": os.getpid()}

    async def host(self) -> dict[str, Any]:
        return await self._call(self.client.host())

    async def create(self, config: dict[str, Any], start: bool = True) -> dict[str, Any]:
        return await self._call(self.client.create(config, start=start))

    async def list(self) -> dict[str, Any]:
        return await self._call(self.client.list())

    async def get(self, vm_id: str) -> dict[str, Any]:
        return await self._call(self.client.get(vm_id))

    async def exec(self, vm_id: str, request: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.client.exec(vm_id, request))

    async def stop(self, vm_id: str) -> dict[str, Any]:
        return await self._call(self.client.stop(vm_id))
