"""Placement across hosts on Ray (optional extra ``[ray]``).

One :class:`~.actor.HostActor` per host node, pinned to it, as a thin client of that node's
host agent; :class:`Cluster` places VMs with the power of K choices and reports VMs of a
vanished host as lost. Ray is imported only when a :class:`Cluster` connects, so the rest
of the package works without it. ``VmHandle.exec`` runs a command through the VM's guest
agent, via its host's agent.
"""

from __future__ import annotations

from .client import HostAgentClient, HostAgentUnreachableError
from .cluster import HOST_RESOURCE, Cluster, ClusterFullError, HostLostError, HostState, VmHandle

__all__ = [
    "HOST_RESOURCE",
    "Cluster",
    "ClusterFullError",
    "HostAgentClient",
    "HostAgentUnreachableError",
    "HostLostError",
    "HostState",
    "VmHandle",
]
