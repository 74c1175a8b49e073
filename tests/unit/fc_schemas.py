"""Request schemas of Firecracker's HTTP API, per release, written from its published spec.

Source: ``src/firecracker/swagger/firecracker.yaml`` (``src/api_server/swagger/...`` up to
v1.5) at each release tag of github.com/firecracker-microvm/firecracker; only the request
bodies this project sends are modelled. Like Firecracker's own ``serde(deny_unknown_fields)``
every model rejects unknown fields, and (strict) values of the wrong JSON type. A field the
spec marks deprecated is modelled with :func:`deprecated`: a body that uses it fails too.

Releases modelled: each side of every version branch in the client (``vm/snapshot_api.py``:
v1.1, v1.6, v1.12, v1.13, v1.16), v1.0.0 (oldest supported) and v1.14.1 (the default). What
changed between them, for these bodies (besides descriptions):

* v1.1.0: ``SnapshotLoadParams.mem_backend`` added, ``mem_file_path`` deprecated (and no
  longer required: exactly one of the two); ``CpuTemplate`` gains ``None``.
* v1.5.0: ``cpu_template`` deprecated (more templates listed).
* v1.6.0: ``SnapshotCreateParams.version`` removed; ``Drive.socket`` added, only
  ``drive_id`` and ``is_root_device`` required.
* v1.11.0: ``MachineConfiguration.huge_pages`` added.
* v1.12.0: ``SnapshotLoadParams.network_overrides`` added.
* v1.13.0: ``SnapshotLoadParams.track_dirty_pages`` added, ``enable_diff_snapshots``
  deprecated. (v1.14.1 and v1.15.0: no change to these bodies.)
* v1.16.1: ``SnapshotLoadParams.vsock_override`` and ``clock_realtime``,
  ``NetworkInterface.mtu`` added.
* Every release: ``Vsock.vsock_id`` deprecated ("since v1.0.0"; "will be removed").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

Int64 = Annotated[int, Field(ge=0, le=2**63 - 1)]  # swagger: integer, format int64, minimum 0


def deprecated(note: str) -> Any:
    """An optional field the spec marks deprecated: sending it fails validation."""
    return Field(default=None, json_schema_extra={"deprecated": note})


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="after")
    def _no_deprecated_field(self) -> Self:
        used = []
        for name in sorted(self.model_fields_set):
            extra = type(self).model_fields[name].json_schema_extra
            if isinstance(extra, dict) and "deprecated" in extra:
                used.append(f"{name} is deprecated: {extra['deprecated']}")
        if used:
            raise ValueError("; ".join(used))
        return self


# -- shared by every modelled release -------------------------------------------------------


class TokenBucket(Body):
    size: Int64
    refill_time: Int64
    one_time_burst: Int64 | None = None


class RateLimiter(Body):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


class BootSource(Body):
    kernel_image_path: str
    boot_args: str | None = None
    initrd_path: str | None = None


class PartialDrive(Body):
    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None


class NetworkInterface(Body):
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class PartialNetworkInterface(Body):
    iface_id: str
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class Vsock(Body):
    guest_cid: int = Field(ge=3)
    uds_path: str
    vsock_id: str | None = deprecated("since v1.0.0, to be removed in a future release")


class InstanceActionInfo(Body):
    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class Metrics(Body):
    metrics_path: str


class Vm(Body):
    state: Literal["Paused", "Resumed"]


class MemoryBackend(Body):  # v1.1+
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(Body):  # v1.12+
    iface_id: str
    host_dev_name: str


class VsockOverride(Body):  # v1.16+
    uds_path: str


# -- machine-config -------------------------------------------------------------------------


class MachineConfigurationV1_0(Body):
    vcpu_count: int = Field(ge=1, le=32)
    mem_size_mib: int
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    cpu_template: Literal["C3", "T2"] | None = None


class MachineConfigurationV1_1(MachineConfigurationV1_0):
    cpu_template: Literal["C3", "T2", "None"] | None = None  # type: ignore[assignment]


_CPU_TEMPLATES = Literal["C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None"]


class MachineConfigurationV1_5(MachineConfigurationV1_0):
    cpu_template: _CPU_TEMPLATES | None = deprecated(  # type: ignore[assignment]
        "since v1.5 (static CPU templates), to be removed in a future release"
    )


class MachineConfigurationV1_11(MachineConfigurationV1_5):
    huge_pages: Literal["None", "2M"] | None = None


# -- drives ---------------------------------------------------------------------------------


class _DriveCommon(Body):
    drive_id: str
    is_root_device: bool
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    rate_limiter: RateLimiter | None = None


class DriveV1_0(_DriveCommon):
    path_on_host: str
    is_read_only: bool


class DriveV1_6(_DriveCommon):
    path_on_host: str | None = None
    is_read_only: bool | None = None
    socket: str | None = None  # vhost-user


class NetworkInterfaceV1_16(NetworkInterface):
    mtu: int | None = Field(default=None, ge=68, le=65535)


# -- snapshots ------------------------------------------------------------------------------


class SnapshotCreateParamsV1_6(Body):
    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] | None = None


class SnapshotCreateParamsV1_0(SnapshotCreateParamsV1_6):
    version: str | None = None  # the snapshot format to write; removed in v1.6


class SnapshotLoadParamsV1_0(Body):
    snapshot_path: str
    mem_file_path: str
    enable_diff_snapshots: bool | None = None
    resume_vm: bool | None = None


class SnapshotLoadParamsV1_1(Body):
    snapshot_path: str
    mem_backend: MemoryBackend | None = None
    mem_file_path: str | None = deprecated("since v1.1: use mem_backend")
    enable_diff_snapshots: bool | None = None
    resume_vm: bool | None = None

    @model_validator(mode="after")
    def _one_memory_source(self) -> Self:
        given = {"mem_backend", "mem_file_path"} & self.model_fields_set
        if len(given) != 1:
            raise ValueError("exactly one of mem_backend and mem_file_path must be present")
        return self


class SnapshotLoadParamsV1_12(SnapshotLoadParamsV1_1):
    network_overrides: list[NetworkOverride] | None = None


class SnapshotLoadParamsV1_13(SnapshotLoadParamsV1_12):
    enable_diff_snapshots: bool | None = deprecated(  # type: ignore[assignment]
        "since v1.13: use track_dirty_pages"
    )
    track_dirty_pages: bool | None = None


class SnapshotLoadParamsV1_16(SnapshotLoadParamsV1_13):
    vsock_override: VsockOverride | None = None
    clock_realtime: bool | None = None


# -- releases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """The request models of one Firecracker release, by endpoint."""

    machine_config: type[Body]
    drive: type[Body]
    network_interface: type[Body]
    snapshot_create: type[Body]
    snapshot_load: type[Body]

    def model_for(self, method: str, path: str) -> type[Body]:
        """The body model of ``method path``; ``KeyError`` for an endpoint not modelled."""
        fixed: dict[tuple[str, str], type[Body]] = {
            ("PUT", "/machine-config"): self.machine_config,
            ("PUT", "/boot-source"): BootSource,
            ("PUT", "/vsock"): Vsock,
            ("PUT", "/actions"): InstanceActionInfo,
            ("PUT", "/metrics"): Metrics,
            ("PATCH", "/vm"): Vm,
            ("PUT", "/snapshot/create"): self.snapshot_create,
            ("PUT", "/snapshot/load"): self.snapshot_load,
        }
        if (method, path) in fixed:
            return fixed[(method, path)]
        by_id: dict[tuple[str, str], type[Body]] = {
            ("PUT", "drives"): self.drive,
            ("PATCH", "drives"): PartialDrive,
            ("PUT", "network-interfaces"): self.network_interface,
            ("PATCH", "network-interfaces"): PartialNetworkInterface,
        }
        match = re.fullmatch(r"/(drives|network-interfaces)/[^/]+", path)
        if match is None:
            raise KeyError(f"{method} {path}")
        return by_id[(method, match[1])]

    def validate(self, method: str, path: str, body: dict[str, Any]) -> Body:
        """Validate ``body`` as Firecracker would; the id in the path must match the body's."""
        model = self.model_for(method, path)
        parsed = model.model_validate(body)
        if path.startswith(("/drives/", "/network-interfaces/")):
            key = "drive_id" if path.startswith("/drives/") else "iface_id"
            if body.get(key) != path.rsplit("/", 1)[1]:
                raise ValueError(f"{method} {path}: body {key} {body.get(key)!r} != path id")
        return parsed


_V1_0 = Release(
    machine_config=MachineConfigurationV1_0,
    drive=DriveV1_0,
    network_interface=NetworkInterface,
    snapshot_create=SnapshotCreateParamsV1_0,
    snapshot_load=SnapshotLoadParamsV1_0,
)
_V1_1 = Release(
    machine_config=MachineConfigurationV1_1,
    drive=DriveV1_0,
    network_interface=NetworkInterface,
    snapshot_create=SnapshotCreateParamsV1_0,
    snapshot_load=SnapshotLoadParamsV1_1,
)
_V1_5 = Release(
    machine_config=MachineConfigurationV1_5,
    drive=DriveV1_0,
    network_interface=NetworkInterface,
    snapshot_create=SnapshotCreateParamsV1_0,
    snapshot_load=SnapshotLoadParamsV1_1,
)
_V1_6 = Release(
    machine_config=MachineConfigurationV1_5,
    drive=DriveV1_6,
    network_interface=NetworkInterface,
    snapshot_create=SnapshotCreateParamsV1_6,
    snapshot_load=SnapshotLoadParamsV1_1,
)
_V1_11 = Release(
    machine_config=MachineConfigurationV1_11,
    drive=DriveV1_6,
    network_interface=NetworkInterface,
    snapshot_create=SnapshotCreateParamsV1_6,
    snapshot_load=SnapshotLoadParamsV1_1,
)
_V1_12 = Release(
    machine_config=MachineConfigurationV1_11,
    drive=DriveV1_6,
    network_interface=NetworkInterface,
    snapshot_create=SnapshotCreateParamsV1_6,
    snapshot_load=SnapshotLoadParamsV1_12,
)
_V1_13 = Release(
    machine_config=MachineConfigurationV1_11,
    drive=DriveV1_6,
    network_interface=NetworkInterface,
    snapshot_create=SnapshotCreateParamsV1_6,
    snapshot_load=SnapshotLoadParamsV1_13,
)
_V1_16 = Release(
    machine_config=MachineConfigurationV1_11,
    drive=DriveV1_6,
    network_interface=NetworkInterfaceV1_16,
    snapshot_create=SnapshotCreateParamsV1_6,
    snapshot_load=SnapshotLoadParamsV1_16,
)

#: Every modelled release -> its request models.
RELEASES: dict[str, Release] = {
    "v1.0.0": _V1_0,
    "v1.1.0": _V1_1,
    "v1.5.0": _V1_5,
    "v1.6.0": _V1_6,
    "v1.11.0": _V1_11,
    "v1.12.0": _V1_12,
    "v1.13.0": _V1_13,
    "v1.14.1": _V1_13,
    "v1.15.0": _V1_13,
    "v1.16.1": _V1_16,
}
