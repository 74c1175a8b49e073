"""The host agent's errors and the one table that maps every error to an HTTP status.

The agent raises the library's own exceptions (``ConfigError``, ``RegistryError``, ...) plus
the few below, which only exist once there is a host that can say no. All of them stay in
the one tree under :class:`~ironclaw_orchestrator.errors.IronclawError`; the message is sent
to the client unchanged, so an HTTP client reads the same words as a library user.
"""

from __future__ import annotations

from ..errors import (
    AgentError,
    AgentRequestError,
    CleanupError,
    ConfigError,
    HostError,
    IronclawError,
    RegistryError,
    UsageError,
    VmError,
)

__all__ = [
    "AdmissionError",
    "DrainingError",
    "HostFullError",
    "NotFoundError",
    "PolicyError",
    "RequestError",
    "TooManyStartingError",
    "status_for",
]


class RequestError(IronclawError):
    """The HTTP request itself is malformed (not JSON, too large, bad query value)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class NotFoundError(IronclawError):
    """No VM (running or defined) with that id on this host."""


class PolicyError(IronclawError):
    """The request is valid but this host agent does not allow it (e.g. a host path)."""


class AdmissionError(IronclawError):
    """The host refuses to start another VM now; ``reason`` is a stable machine word."""

    reason = "refused"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class HostFullError(AdmissionError):
    """Committed vCPUs or memory (with the overcommit ratio) would exceed capacity."""

    reason = "host_full"


class TooManyStartingError(AdmissionError):
    """The cap on concurrently starting VMs is reached; retry shortly or elsewhere."""

    reason = "too_many_starting"


class DrainingError(AdmissionError):
    """The agent is draining (SIGTERM): it admits nothing new."""

    reason = "draining"


#: ``(exception class, HTTP status)`` in lookup order: the first match wins.
STATUS_TABLE: tuple[tuple[type[IronclawError], int], ...] = (
    (DrainingError, 503),
    (AdmissionError, 429),
    (NotFoundError, 404),
    (PolicyError, 403),
    (ConfigError, 422),
    (RegistryError, 409),  # the id is in use (unknown ids are NotFoundError)
    (UsageError, 409),
    (HostError, 503),  # the host cannot run VMs (KVM, binaries, cgroups, chroot base)
    (AgentRequestError, 422),  # the guest agent refused the request (its code says why)
    (AgentError, 502),  # the guest agent cannot be reached or misbehaved
    (CleanupError, 500),
    (VmError, 500),
    (IronclawError, 500),
)


def status_for(exc: IronclawError) -> int:
    """The HTTP status for ``exc`` (``RequestError`` carries its own)."""
    if isinstance(exc, RequestError):
        return exc.status
    for cls, status in STATUS_TABLE:
        if isinstance(exc, cls):
            return status
    return 500
