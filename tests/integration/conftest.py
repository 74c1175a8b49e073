"""Integration fixtures: skip without root, /dev/kvm or the real binaries; prove cleanup."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (the jailer requires it)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not read/writable"
    for name, env in (("firecracker", "IRONCLAW_FIRECRACKER"), ("jailer", "IRONCLAW_JAILER")):
        if not (os.environ.get(env) or shutil.which(name)):
            return f"no {name} binary (put it on PATH or set {env}); see README 'Quick start'"
    return None


@pytest.fixture
def real_host() -> None:
    reason = _missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def vm_id(real_host: None) -> Iterator[str]:
    """A unique VM id; after the test, nothing named after it may remain on the host."""
    ident = f"it-{uuid.uuid4().hex[:10]}"
    yield ident
    left = leftovers(ident)
    assert not left, f"test left VM resources behind: {left}"


@pytest.fixture
def exec_name(real_host: None) -> str:
    """The jailer's name for this host's firecracker (its resolved basename)."""
    from ironclaw_orchestrator.names import exec_file_name
    from ironclaw_orchestrator.vm.binaries import find_firecracker

    return exec_file_name(find_firecracker())


@pytest.fixture
def chroot_base() -> Path:
    base = Path("/var/jail")
    base.mkdir(mode=0o755, exist_ok=True)
    return base
