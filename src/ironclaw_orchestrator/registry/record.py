"""The VM record: its model, and how it is encoded in and decoded from a record file.

Pure (no file I/O, no locking): :mod:`.store` moves the bytes, :class:`~.Registry` decides
when. A record file is one line of compact JSON, padded with spaces before its newline to
:data:`RECORD_SIZE` bytes so that later updates overwrite it in place (see :mod:`.store`);
JSON allows the trailing whitespace, so ``json.loads`` and ``jq`` read it as they always did.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import names
from ..errors import ConfigError, RegistryError
from ..procfs import is_alive

__all__ = [
    "FIELDS",
    "LOG_SUFFIX",
    "RECORD_FORMAT",
    "RECORD_SIZE",
    "RECORD_SUFFIX",
    "CorruptRecord",
    "RegistryScan",
    "VmRecord",
    "VmState",
    "check_vm_id",
    "decode_record",
    "encode_record",
    "log_name",
    "make_record",
    "pad_record",
    "record_name",
]

RECORD_SUFFIX = ".json"
LOG_SUFFIX = ".log"
#: Format of a record file; bumped when a field changes meaning.
RECORD_FORMAT = 1
#: Size a record file is padded to: one page, which the kernel copies whole in one write.
RECORD_SIZE = 4096

VmState = Literal["starting", "running", "stopping"]


def check_vm_id(vm_id: str) -> str:
    """Reject ids that are not safe as file names (and everywhere else we use them)."""
    return names.check_id(vm_id, "vm_id")


def record_name(vm_id: str) -> str:
    """File name of the record of ``vm_id`` (checked)."""
    return f"{check_vm_id(vm_id)}{RECORD_SUFFIX}"


def log_name(vm_id: str) -> str:
    """File name of the supervisor log of ``vm_id`` (checked)."""
    return f"{check_vm_id(vm_id)}{LOG_SUFFIX}"


class VmRecord(BaseModel):
    """What the registry knows about one VM. Fields stay ``None`` until the thing exists.

    Resource fields (``run_dir`` .. ``tap``) name only what *we* created for this VM, so
    garbage collection removes exactly those.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: int = RECORD_FORMAT
    vm_id: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    state: VmState = "starting"
    #: ``True`` jailed, ``False`` development mode; ``None`` until the VMM runs.
    sandboxed: bool | None = None
    #: A supervisor process owns it (``ironclaw vm start -d``).
    detached: bool = False
    #: The orchestrator / supervisor process that owns the VM.
    owner_pid: int
    owner_start_time: int
    vmm_pid: int | None = None
    vmm_start_time: int | None = None
    uid: int | None = None
    gid: int | None = None
    run_dir: Path | None = None
    jail_dir: Path | None = None
    #: ``VmCgroups.to_dict()``.
    cgroups: dict[str, Any] | None = None
    #: Only a namespace we created (never one the user passed in).
    netns_name: str | None = None
    tap: str | None = None
    #: We created a veth uplink from ``netns_name`` to the host.
    uplink: bool = False
    api_socket: Path | None = None
    console_path: Path | None = None
    #: Output of the supervisor of a detached VM.
    log_path: Path | None = None
    vcpus: int | None = None
    memory_mb: int | None = None
    memory_limit_mb: int | None = None
    #: ``VmConfig.model_dump(mode="json")``, for ``ironclaw vm ls``.
    config: dict[str, Any] | None = None

    def owner_alive(self) -> bool:
        return is_alive(self.owner_pid, self.owner_start_time)

    def vmm_alive(self) -> bool:
        return is_alive(self.vmm_pid, self.vmm_start_time)


#: The fields a caller may set (``format`` and ``vm_id`` are the registry's).
FIELDS = frozenset(VmRecord.model_fields) - {"format", "vm_id"}


@dataclass(frozen=True)
class CorruptRecord:
    """A record file that could not be read or parsed."""

    path: Path
    error: str


@dataclass
class RegistryScan:
    """Every record that could be read, and every file that could not."""

    records: list[VmRecord] = field(default_factory=list)
    problems: list[CorruptRecord] = field(default_factory=list)


def encode_record(record: VmRecord) -> bytes:
    """The record as one line of compact JSON (unpadded; see :func:`pad_record`)."""
    return record.model_dump_json().encode() + b"\n"


def pad_record(data: bytes, size: int = RECORD_SIZE) -> bytes:
    """``data`` (one JSON line) padded with spaces before its newline to ``size`` bytes.

    Returned unchanged if it is that long already: a record larger than a page is written
    whole each time (see :mod:`.store`).
    """
    missing = size - len(data)
    if missing <= 0:
        return data
    return data[:-1] + b" " * missing + b"\n"


def decode_record(raw: bytes, path: Path | str) -> VmRecord:
    """Parse the contents of the record file ``path``; ``RegistryError`` if invalid."""
    try:
        record = VmRecord.model_validate_json(raw)
    except (ValueError, ValidationError) as exc:
        raise RegistryError(
            f"VM record {path} is corrupt ({str(exc).splitlines()[0]}); run `ironclaw gc`, "
            "which moves it aside"
        ) from exc
    if record.format != RECORD_FORMAT:
        raise RegistryError(
            f"VM record {path} has format {record.format}, this ironclaw reads format "
            f"{RECORD_FORMAT}; use the ironclaw version that wrote it"
        )
    if f"{record.vm_id}{RECORD_SUFFIX}" != os.path.basename(path):
        raise RegistryError(
            f"VM record {path} names VM {record.vm_id!r}, not its file name; it is corrupt: "
            "run `ironclaw gc`, which moves it aside"
        )
    return record


def make_record(vm_id: str, fields: dict[str, Any], base: VmRecord | None) -> VmRecord:
    """``base`` (or a new record) with ``fields`` set, validated; ``ConfigError`` naming the
    VM for an unknown field or a bad value."""
    unknown = set(fields) - FIELDS
    if unknown:
        raise ConfigError(
            f"VM {vm_id}: unknown registry field(s) {sorted(unknown)}; known fields: "
            f"{sorted(FIELDS)}"
        )
    # The base's field values are validated already (a frozen model): validating them again
    # from Python objects is cheap, unlike a round trip through model_dump.
    data = dict(base.__dict__) if base is not None else {}
    data.update(fields)
    data["vm_id"] = vm_id
    try:
        return VmRecord.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"VM {vm_id}: invalid registry record: {exc}") from exc
