"""Network namespaces, taps and uplinks without root: files and sets under a directory.

Installed over :mod:`ironclaw_orchestrator.vm.netns` (what start and stop call) by
:func:`install`. Like the kernel it refuses a tap or uplink in a namespace that does not
exist, and deleting a namespace deletes every device in it. ``fail`` names a step
(``"tap"``, ``"uplink"``) that raises ``NetworkError``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import NetworkError
from ironclaw_orchestrator.vm import netns as ns


class FakeNet:
    def __init__(self, root: Path) -> None:
        self.dir = root
        self.devices: dict[str, set[str]] = {}  # netns -> taps and uplink ends in it
        self.fail: str | None = None
        self.opened = 0  # nameless namespaces handed to a jailer

    def _need(self, netns: str) -> None:
        if not (self.dir / netns).exists():
            raise NetworkError(f"network namespace {netns} does not exist")

    def ensure_netns(self, name: str) -> Path:
        path = self.dir / name
        path.touch()
        self.devices.setdefault(name, set())
        return path

    def claim_netns_name(self, name: str) -> Path:
        path = self.dir / name
        path.touch(exist_ok=False)  # FileExistsError if taken, as the real exclusive create
        return path

    def create_claimed_netns(self, name: str) -> Path:
        path = self.dir / name
        if not path.exists():
            raise NetworkError(f"network namespace {name} was not claimed")
        self.devices.setdefault(name, set())
        return path

    def remove_netns(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)
        self.devices.pop(name, None)  # the kernel frees its devices with it

    def ensure_tap(self, netns: str, name: str, uid: int, gid: int, **kw: object) -> None:
        self._need(netns)
        if self.fail == "tap":
            raise NetworkError(f"cannot create tap {name} in {netns}: injected")
        self.devices[netns].add(name)

    def remove_tap(self, netns: str, name: str) -> None:
        self.devices.get(netns, set()).discard(name)

    def ensure_uplink(self, netns: str, vm_id: str, subnet: str) -> None:
        self._need(netns)
        if self.fail == "uplink":
            raise NetworkError(f"cannot create the uplink of {vm_id}: injected")
        self.devices[netns].add(f"uplink-{vm_id}")

    def remove_uplink(self, netns: str, vm_id: str) -> None:
        self.devices.get(netns, set()).discard(f"uplink-{vm_id}")

    def create_vm_netns(self) -> socket.socket:
        """A nameless namespace: its probe, a netlink socket (here in our own namespace)."""
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)

    def open_netns(self, probe: socket.socket) -> int:
        """What the jailer joins (here our own namespace: nothing to leave behind)."""
        self.opened += 1
        return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


def install(monkeypatch: pytest.MonkeyPatch, root: Path) -> FakeNet:
    root.mkdir(exist_ok=True)
    net = FakeNet(root)
    monkeypatch.setattr(ns.names, "NETNS_DIR", root)
    # No kernel namespace to probe or keep: reuse is off, as IRONCLAW_NETNS_POOL=0 makes it.
    monkeypatch.setattr(ns, "netns_pool", ns.NetnsPool(size=0))
    for name in (
        "ensure_netns", "claim_netns_name", "create_claimed_netns", "remove_netns",
        "create_vm_netns", "open_netns",
    ):  # fmt: skip
        monkeypatch.setattr(ns, name, getattr(net, name))
    for name in ("ensure_tap", "remove_tap"):
        monkeypatch.setattr(ns, name, getattr(net, name))
    for name in ("ensure_uplink", "remove_uplink"):
        monkeypatch.setattr(ns, name, getattr(net, name))
    return net
