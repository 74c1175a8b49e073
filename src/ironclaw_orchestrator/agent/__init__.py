"""The guest agent (``ironclaw-agent``) and its host client.

Guest side (standard library only, copied into images by ``ironclaw image add-agent``):
:mod:`.protocol`, :mod:`.server`, :mod:`.commands`, :mod:`.files`. Host side:
:class:`AgentClient` and the result types. The same client talks to an agent in a VM (vsock)
or on this host (Unix socket)::

    agent = await AgentClient.connect_unix("/tmp/agent.sock")
    result = await agent.exec(["uname", "-a"], timeout_s=10)

The wire protocol is documented in docs/agent-protocol.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .protocol import DEFAULT_VSOCK_PORT, PROTOCOL_VERSION

if TYPE_CHECKING:
    from .client import AgentClient
    from .messages import (
        AgentInfo,
        ExecEvent,
        ExecExit,
        ExecOutput,
        ExecResult,
        ExecStarted,
        ExecTruncated,
        FileTransfer,
    )

# The client and its message models (pydantic) are imported on first use, not with the
# package: every VM handle imports .vmhandle, and most VMs never talk to an agent.
_LAZY = {
    "AgentClient": "client",
    "AgentInfo": "messages",
    "ExecEvent": "messages",
    "ExecExit": "messages",
    "ExecOutput": "messages",
    "ExecResult": "messages",
    "ExecStarted": "messages",
    "ExecTruncated": "messages",
    "FileTransfer": "messages",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_VSOCK_PORT",
    "PROTOCOL_VERSION",
    "AgentClient",
    "AgentInfo",
    "ExecEvent",
    "ExecExit",
    "ExecOutput",
    "ExecResult",
    "ExecStarted",
    "ExecTruncated",
    "FileTransfer",
]
