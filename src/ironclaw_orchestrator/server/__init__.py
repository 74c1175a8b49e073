"""The host agent (``ironclaw serve``): one host's VMs over an HTTP+JSON API.

FastAPI + uvicorn on a Unix socket (root only), optionally TCP with a bearer token. VMs are
owned by their per-VM supervisors, so the agent can restart without losing any; see
:mod:`.agent` for the logic, :mod:`.app` for the API, :mod:`.admission` for the rules that
make a full host say no, and :mod:`.runner` for sockets and signals.
"""

from __future__ import annotations

from .admission import Admission, Capacity, Usage
from .agent import HostAgent
from .app import create_app
from .errors import (
    AdmissionError,
    DrainingError,
    HostFullError,
    NotFoundError,
    PolicyError,
    TooManyStartingError,
)
from .runner import serve
from .settings import AgentSettings

__all__ = [
    "Admission",
    "AdmissionError",
    "AgentSettings",
    "Capacity",
    "DrainingError",
    "HostAgent",
    "HostFullError",
    "NotFoundError",
    "PolicyError",
    "TooManyStartingError",
    "Usage",
    "create_app",
    "serve",
]
