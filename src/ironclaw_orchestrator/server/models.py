"""Response shapes of the host agent's API, for its OpenAPI document and for clients.

Requests need no models here: a VM's body is the library's own ``VmConfig``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = ["ERROR_RESPONSES", "ErrorBody", "HostInfo", "StopResult", "VmInfo"]


class ErrorDetail(BaseModel):
    #: The library's exception class, e.g. ``ConfigError``, ``HostFullError``.
    type: str
    message: str
    status: int
    #: For refusals: ``host_full``, ``too_many_starting`` or ``draining``.
    reason: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class VmInfo(BaseModel):
    vm_id: str
    #: defined, starting, running, stopping, exited (VMM gone) or stale (owner gone).
    status: str
    host: str
    vcpus: int | None = None
    memory_mb: int | None = None
    sandboxed: bool | None = None
    created_at: str | None = None
    uptime_s: float | None = None
    vmm_pid: int | None = None
    supervisor_pid: int | None = None
    detached: bool | None = None


class StopResult(BaseModel):
    vm_id: str
    #: ``stopped`` (a VM) or ``deleted`` (a definition).
    status: str
    #: The gc report when the supervisor was gone and gc cleaned up instead.
    gc: dict[str, Any] | None = None


class HostCapacity(BaseModel):
    vcpus: int
    memory_mb: int
    cpu_overcommit: float
    memory_overcommit: float
    admit_vcpus: int
    admit_memory_mb: int
    max_starting: int


class HostCommitted(BaseModel):
    vcpus: int
    memory_mb: int


class HostInfo(BaseModel):
    hostname: str
    version: str
    #: ``ok``, ``draining`` or ``unhealthy: <why>``.
    health: str
    draining: bool
    labels: dict[str, str]
    capacity: HostCapacity
    committed: HostCommitted
    starting: int
    vms: int
    started_at: str
    uptime_s: float
    #: VMs found running (and re-adopted) when this agent started.
    adopted: list[str]
    #: VMs found dead and garbage-collected when this agent started.
    collected: list[str]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": what}
    for code, what in (
        (400, "The body is not JSON, or empty"),
        (401, "TCP request without the right bearer token"),
        (403, "Not allowed on this host (host-owned key, image outside --image-dir)"),
        (404, "No such VM"),
        (409, "The VM id is in use"),
        (413, "Body too large"),
        (422, "Invalid VmConfig or query (each bad key named); guest agent refused"),
        (429, "Host full or too many VMs starting (reason, Retry-After)"),
        (500, "The VM failed (the library's error)"),
        (502, "The guest agent cannot be reached"),
        (503, "Draining, or the host cannot run VMs"),
    )
}
