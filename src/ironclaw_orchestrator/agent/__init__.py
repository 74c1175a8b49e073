"""The guest agent (``ironclaw-agent``) and its host client.

Guest side (standard library only, copied into images by ``ironclaw image add-agent``):
:mod:`.protocol`, :mod:`.server`, :mod:`.commands`, :mod:`.files`. Host side:
:class:`AgentClient` and the result types. The same client talks to an agent in a VM (vsock)
or on this host (Unix socket)::

    agent = await AgentClient.connect_unix("/tmp/agent.sock")
    result = await agent.exec(["uname", "-a"], timeout_s=10)

The wire protocol is documented in docs/agent-protocol.md.
"""

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
from .protocol import DEFAULT_VSOCK_PORT, PROTOCOL_VERSION

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
