"""Every request body the client builds is valid for every supported Firecracker release.

Bodies come from the project's real builders (``FirecrackerApi``'s methods, the start path's
``_configure`` and ``snapshot_api``), recorded instead of sent, and are validated against the
models in ``fc_schemas`` (written from each release's published API spec): a field a release
does not know, one it has deprecated, or a value of the wrong type fails here, before a user
meets it. A real v1.0.0 accepting these bodies is checked in
``tests/integration/test_api_bodies_real.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import pytest
from fc_schemas import RELEASES
from pydantic import ValidationError

from ironclaw_orchestrator.vm import _configure, snapshot_api
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.binaries import Version
from ironclaw_orchestrator.vm.config import VmConfig
from ironclaw_orchestrator.vm.jailer import JailerProcess
from ironclaw_orchestrator.vm.ratelimit import RateLimit, TokenBucket

Call = tuple[str, str, dict[str, Any]]

BANDWIDTH = TokenBucket(size=10 << 20, refill_time_ms=1000, one_time_burst=64 << 20)
OPS = TokenBucket(size=1000, refill_time_ms=100)
LIMITS = [
    RateLimit(bandwidth=BANDWIDTH, ops=OPS),
    RateLimit(bandwidth=BANDWIDTH),
    RateLimit(ops=OPS),
    RateLimit(),  # no limit (PUT leaves it out; PATCH disables both buckets)
]


class Recorder(FirecrackerApi):
    """The real client with its transport replaced: every request is recorded, none sent."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent/api.sock"), vm_id="schema-test")
        self.calls: list[Call] = []

    async def request_all(
        self, calls: Sequence[tuple[str, str, dict[str, Any] | None]], *,
        timeout_s: float | None = None,
    ) -> list[Any]:  # fmt: skip
        # Every request goes through here: request() and the typed helpers too.
        self.calls += [(method, path, body) for method, path, body in calls if body is not None]
        return [None] * len(calls)


def configure_calls() -> list[Call]:
    """What starting a VM sends, for configurations that use every optional device."""
    calls: list[Call] = []
    jailed = object.__new__(JailerProcess)  # _configure only asks whether it is jailed
    for i, limit in enumerate(LIMITS):
        config = VmConfig(
            vm_id=f"schema-{i}",
            vcpu_count=2,
            memory_mb=256,
            rootfs_read_only=bool(i % 2),
            enable_networking=True,
            vsock_guest_cid=3 + i,
            drive_rate_limit=limit,
            net_rx_rate_limit=limit,
            net_tx_rate_limit=LIMITS[-1 - i],
        )
        api = Recorder()
        asyncio.run(_configure(SimpleNamespace(config=config, api=api, vmm=jailed)))  # type: ignore[arg-type]
        calls += api.calls
    bare = Recorder()
    plain = VmConfig(vm_id="schema-bare", rootfs_path=None)
    asyncio.run(_configure(SimpleNamespace(config=plain, api=bare, vmm=jailed)))  # type: ignore[arg-type]
    return calls + bare.calls


def runtime_calls() -> list[Call]:
    """What a running VM's handle and the CLI send (actions, pause/resume, limits, metrics)."""
    api = Recorder()

    async def send() -> None:
        await api.instance_start()
        await api.send_ctrl_alt_del()
        await api.flush_metrics()
        await api.put_metrics(PurePosixPath("/metrics.json"))
        await api.pause()
        await api.resume()
        for limit in LIMITS:
            await api.patch_drive_rate_limit("rootfs", limit)
            await api.patch_network_rate_limits("eth0", rx=limit)
            await api.patch_network_rate_limits("eth0", tx=limit)
            await api.patch_network_rate_limits("eth0", rx=limit, tx=LIMITS[0])

    asyncio.run(send())
    return api.calls


def snapshot_calls(version: Version) -> list[Call]:
    """Snapshot create and load bodies, with every option ``version`` supports."""
    api = Recorder()
    snap, mem = PurePosixPath("/snap/vm.snap"), PurePosixPath("/snap/vm.mem")
    can = snapshot_api.supports_overrides(version)
    taps = {"eth0": "tap-new"} if can["network_overrides"] else None
    vsock = PurePosixPath("/run/v.sock") if can["vsock_override"] else None

    async def send() -> None:
        for diff in (False, True):
            await api.create_snapshot(snapshot_api.create_body(version, snap, mem, diff=diff))
        for resume in (False, True):
            for track in (False, True):
                await api.load_snapshot(
                    snapshot_api.load_body(
                        version, snap, mem, resume=resume, track_dirty_pages=track,
                        network_overrides=taps, vsock_uds_path=vsock,
                    )
                )  # fmt: skip
        await api.load_snapshot(snapshot_api.load_body(version, snap, mem, resume=True))

    asyncio.run(send())
    return api.calls


def all_calls(version: Version) -> list[Call]:
    return configure_calls() + runtime_calls() + snapshot_calls(version)


def test_every_endpoint_the_client_uses_is_covered() -> None:
    endpoints = {(m, p.rsplit("/", 1)[0] if p.count("/") > 1 and "snapshot" not in p else p)
                 for m, p, _ in all_calls(Version(1, 16, 1))}  # fmt: skip
    assert endpoints == {
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives"),
        ("PATCH", "/drives"),
        ("PUT", "/network-interfaces"),
        ("PATCH", "/network-interfaces"),
        ("PUT", "/vsock"),
        ("PUT", "/actions"),
        ("PUT", "/metrics"),
        ("PATCH", "/vm"),
        ("PUT", "/snapshot/create"),
        ("PUT", "/snapshot/load"),
    }


@pytest.mark.parametrize("release", list(RELEASES))
def test_every_body_is_valid_for_the_release(release: str) -> None:
    models = RELEASES[release]
    calls = all_calls(Version.parse(release))
    assert len(calls) > 40
    errors = []
    for method, path, body in calls:
        try:
            models.validate(method, path, body)
        except (ValidationError, ValueError) as exc:
            errors.append(f"{method} {path} {body}: {exc}")
    assert not errors, "\n".join(errors)


# -- the models catch what they must: each body below is one mistake away from a real one --

V1_0 = RELEASES["v1.0.0"]
VSOCK = {"guest_cid": 3, "uds_path": "/run/v.sock"}
DRIVE = {"drive_id": "rootfs", "path_on_host": "/rootfs", "is_root_device": True,
         "is_read_only": False}  # fmt: skip


@pytest.mark.parametrize("release", list(RELEASES))
@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("PUT", "/vsock", {**VSOCK, "vsock_id": "vsock0"}, "vsock_id is deprecated"),
        ("PUT", "/vsock", {**VSOCK, "cid": 3}, "Extra inputs are not permitted"),
        ("PUT", "/vsock", {**VSOCK, "guest_cid": 2}, "greater than or equal to 3"),
        ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 256}, "valid integer"),
        ("PUT", "/machine-config", {"vcpu_count": 64, "mem_size_mib": 256}, "less than or equal"),
        ("PUT", "/machine-config", {"vcpu_count": True, "mem_size_mib": 256}, "valid integer"),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "ht_enabled": False},
         "Extra inputs"),
        ("PUT", "/drives/rootfs", {**DRIVE, "is_read_only": 0}, "valid boolean"),
        ("PUT", "/drives/rootfs", {**DRIVE, "drive_id": "other"}, "!= path id"),
        ("PUT", "/drives/rootfs", {**DRIVE, "rate_limiter": {"bandwidth": {"size": 1}}},
         "refill_time"),
        ("PUT", "/drives/rootfs",
         {**DRIVE, "rate_limiter": {"bandwidth": {"size": -1, "refill_time": 1}}},
         "greater than or equal to 0"),
        ("PATCH", "/drives/rootfs", {**DRIVE}, "Extra inputs"),
        ("PUT", "/actions", {"action_type": "Pause"}, "FlushMetrics"),
        ("PATCH", "/vm", {"state": "paused"}, "Paused"),
        ("PUT", "/snapshot/create", {"snapshot_path": "/s", "mem_file_path": "/m",
                                     "snapshot_type": "Incremental"}, "Full"),
        ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0"}, "host_dev_name"),
    ],
)  # fmt: skip
def test_a_wrong_body_fails(
    release: str, method: str, path: str, body: dict[str, Any], error: str
) -> None:
    with pytest.raises((ValidationError, ValueError), match=error):
        RELEASES[release].validate(method, path, body)


@pytest.mark.parametrize(
    ("built_for", "sent_to", "error"),
    [
        # v1.0's load body (mem_file_path) on v1.1+: deprecated there.
        ("v1.0.0", "v1.1.0", "mem_file_path is deprecated"),
        ("v1.0.0", "v1.16.1", "mem_file_path is deprecated"),
        # v1.1's mem_backend on v1.0: unknown there.
        ("v1.1.0", "v1.0.0", "mem_backend"),
        # create's `version` on v1.6+: removed.
        ("v1.5.0", "v1.6.0", "version"),
        # track_dirty_pages on v1.12: unknown; enable_diff_snapshots on v1.13: deprecated.
        ("v1.13.0", "v1.12.0", "track_dirty_pages"),
        ("v1.12.0", "v1.13.0", "enable_diff_snapshots is deprecated"),
        # v1.12's network_overrides on v1.11, v1.16's vsock_override on v1.15.
        ("v1.12.0", "v1.11.0", "network_overrides"),
        ("v1.16.1", "v1.15.0", "vsock_override"),
    ],
)
def test_a_body_for_another_release_fails(built_for: str, sent_to: str, error: str) -> None:
    calls = snapshot_calls(Version.parse(built_for))
    failures = []
    for method, path, body in calls:
        try:
            RELEASES[sent_to].validate(method, path, body)
        except ValidationError as exc:
            failures.append(str(exc))
    assert any(error in f for f in failures), failures


def test_newer_fields_are_unknown_to_older_releases() -> None:
    with pytest.raises(ValidationError, match="huge_pages"):
        RELEASES["v1.6.0"].validate(
            "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}
        )
    with pytest.raises(ValidationError, match="mtu"):
        RELEASES["v1.15.0"].validate(
            "PUT",
            "/network-interfaces/eth0",
            {"iface_id": "eth0", "host_dev_name": "t", "mtu": 1500},
        )
    with pytest.raises(ValidationError, match="cpu_template is deprecated"):
        RELEASES["v1.14.1"].validate(
            "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}
        )
    # v1.0 requires is_read_only; v1.6 made it optional (vhost-user drives have no file).
    body = {"drive_id": "d", "path_on_host": "/d", "is_root_device": False}
    RELEASES["v1.6.0"].validate("PUT", "/drives/d", body)
    with pytest.raises(ValidationError, match="is_read_only"):
        V1_0.validate("PUT", "/drives/d", body)


def test_unmodelled_endpoint_is_an_error_not_a_pass() -> None:
    with pytest.raises(KeyError):
        V1_0.validate("PUT", "/balloon", {"amount_mib": 1})
