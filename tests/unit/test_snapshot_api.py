"""Golden tests of the snapshot API bodies, per Firecracker release."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from ironclaw_orchestrator.vm.binaries import Version
from ironclaw_orchestrator.vm.snapshot_api import (
    create_body,
    diff_needs_tracking,
    load_body,
    supports_overrides,
)

STATE = PurePosixPath("/snapshot/vmstate")
MEM = PurePosixPath("/snapshot/memory")


def v(text: str) -> Version:
    return Version.parse(text)


def test_create_v1_0_pins_the_format_version() -> None:
    assert create_body(v("v1.0.0"), STATE, MEM, diff=False) == {
        "snapshot_type": "Full",
        "snapshot_path": "/snapshot/vmstate",
        "mem_file_path": "/snapshot/memory",
        "version": "1.0.0",
    }
    assert create_body(v("v1.5.1"), STATE, MEM, diff=True)["version"] == "1.5.1"


@pytest.mark.parametrize("release", ["v1.6.0", "v1.14.1", "v1.16.0"])
def test_create_v1_6_on_has_no_version(release: str) -> None:
    assert create_body(v(release), STATE, MEM, diff=True) == {
        "snapshot_type": "Diff",
        "snapshot_path": "/snapshot/vmstate",
        "mem_file_path": "/snapshot/memory",
    }


def test_load_v1_0() -> None:
    assert load_body(v("v1.0.0"), STATE, MEM, resume=True) == {
        "snapshot_path": "/snapshot/vmstate",
        "mem_file_path": "/snapshot/memory",
        "enable_diff_snapshots": False,
        "resume_vm": True,
    }


def test_load_v1_1_uses_mem_backend() -> None:
    assert load_body(v("v1.1.0"), STATE, MEM, resume=False, track_dirty_pages=True) == {
        "snapshot_path": "/snapshot/vmstate",
        "mem_backend": {"backend_type": "File", "backend_path": "/snapshot/memory"},
        "enable_diff_snapshots": True,
        "resume_vm": False,
    }


def test_load_v1_14_with_tap_rename() -> None:
    body = load_body(v("v1.14.1"), STATE, MEM, resume=True, network_overrides={"eth0": "iclabc"})
    assert body == {
        "snapshot_path": "/snapshot/vmstate",
        "mem_backend": {"backend_type": "File", "backend_path": "/snapshot/memory"},
        "track_dirty_pages": False,
        "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "iclabc"}],
    }


def test_load_v1_16_vsock_override() -> None:
    body = load_body(
        v("v1.16.0"), STATE, MEM, resume=True, vsock_uds_path=PurePosixPath("/run/v2.sock")
    )
    assert body["vsock_override"] == {"uds_path": "/run/v2.sock"}


def test_overrides_refused_where_unsupported() -> None:
    assert supports_overrides(v("v1.0.0")) == {"network_overrides": False, "vsock_override": False}
    assert supports_overrides(v("v1.14.1")) == {"network_overrides": True, "vsock_override": False}
    with pytest.raises(ValueError, match=r"v1.12"):
        load_body(v("v1.11.0"), STATE, MEM, resume=True, network_overrides={"eth0": "x"})
    with pytest.raises(ValueError, match=r"v1.16"):
        load_body(v("v1.14.1"), STATE, MEM, resume=True, vsock_uds_path=PurePosixPath("/x"))


@pytest.mark.parametrize(
    ("release", "needed"),
    [("v1.0.0", True), ("v1.13.1", True), ("v1.14.0", False), ("v1.14.1", False)],
)
def test_diff_needs_tracking_before_v1_14(release: str, needed: bool) -> None:
    assert diff_needs_tracking(v(release)) is needed
