"""Work counts of a VM's network namespace: what the helper thread does inside it.

The kernel steps are stand-ins here (no root needed); tests/integration/test_netns_real.py
runs them for real and compares the result with ``ip netns add``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from ironclaw_orchestrator.vm.netns import namespace


@pytest.fixture
def steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Runs the helper's job in this thread and records the kernel steps it takes."""
    seen: list[str] = []

    def in_new_netns(enter: Callable[[], None], func: Callable[[], object]) -> object:
        seen.append("unshare")
        return func()

    real_socket = socket.socket

    def counting_socket(*args: object, **kwargs: object) -> socket.socket:
        seen.append("socket")
        return real_socket(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(namespace, "_run_in_new_netns", in_new_netns)
    monkeypatch.setattr(namespace, "_mount", lambda src, dst, flags: seen.append("mount"))
    monkeypatch.setattr(namespace, "_set_lo_up_here", lambda: seen.append("lo up"))
    monkeypatch.setattr(namespace, "_prepare_run_dir", lambda: None)
    monkeypatch.setattr(namespace, "netns_path", lambda name: tmp_path / name)
    monkeypatch.setattr(namespace.socket, "socket", counting_socket)
    return seen


def test_a_vm_namespace_is_one_unshare_and_one_bind_mount(steps: list[str]) -> None:
    """No socket, no ioctl: lo stays down, as ``ip netns add`` leaves it."""
    path = namespace.claim_netns_name("ironclaw-a")
    assert namespace.create_claimed_netns("ironclaw-a") == path
    assert steps == ["unshare", "mount"]


def test_ensure_netns_still_brings_lo_up(steps: list[str]) -> None:
    """The general-purpose namespace (for other programs) keeps its documented lo up."""
    namespace.ensure_netns("other")
    assert steps == ["unshare", "mount", "lo up"]
