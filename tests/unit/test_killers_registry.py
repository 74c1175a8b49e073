"""Record encoding (registry/record.py): the file format, each way a record file is refused,
and what ``make_record`` accepts (pinned where mutants of the encoding survived)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError, RegistryError
from ironclaw_orchestrator.registry import (
    RECORD_FORMAT,
    RECORD_SIZE,
    Registry,
    VmRecord,
    check_vm_id,
)


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state")


def _record(**fields: object) -> dict[str, object]:
    return {"vm_id": "vm-1", "owner_pid": 1, "owner_start_time": 2, **fields}


def test_record_and_log_paths(reg: Registry) -> None:
    assert reg.record_path("vm-1") == reg.state_dir / "vm-1.json"
    assert reg.log_path("vm-1") == reg.state_dir / "vm-1.log"
    with pytest.raises(ConfigError, match=r"^vm_id '\.\./x' is invalid"):
        reg.log_path("../x")
    assert check_vm_id("abc") == "abc"
    with pytest.raises(ConfigError, match=r"^vm_id 'a b' is invalid"):
        check_vm_id("a b")


def test_record_file_is_one_json_line(reg: Registry) -> None:
    rec = reg.claim("vm-1", vcpus=2)
    raw = reg.record_path("vm-1").read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1 and len(raw) == RECORD_SIZE
    assert raw.rstrip().endswith(b"}")  # padded with spaces, for updates in place
    data = json.loads(raw)
    assert data["format"] == RECORD_FORMAT and data["vm_id"] == "vm-1" and data["vcpus"] == 2
    assert reg.get("vm-1") == rec


def test_round_trip_of_every_kind_of_field(reg: Registry) -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    rec = reg.claim(
        "vm-2",
        created_at=created,
        jail_dir=Path("/srv/jail/firecracker/vm-2"),
        cgroups={"v": 1, "paths": ["a/b"]},
        sandboxed=True,
        uplink=True,
    )
    back = reg.get("vm-2")
    assert back == rec
    assert back is not None and back.created_at == created and back.uplink is True
    assert back.jail_dir == Path("/srv/jail/firecracker/vm-2")


def test_unreadable_record_message(reg: Registry) -> None:
    path = reg.record_path("vm-1")
    path.mkdir()  # reading a directory fails with EISDIR
    with pytest.raises(RegistryError) as info:
        reg.get("vm-1")
    assert str(info.value) == f"cannot read VM record {path}: Is a directory"


def test_symlinked_record_is_not_followed(reg: Registry, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(_record()))
    reg.record_path("vm-1").symlink_to(target)
    with pytest.raises(RegistryError, match=r"^cannot read VM record .*vm-1\.json: "):
        reg.get("vm-1")


def test_missing_record_is_none(reg: Registry) -> None:
    assert reg.get("vm-9") is None


def test_corrupt_record_message(reg: Registry) -> None:
    path = reg.record_path("vm-1")
    path.write_text("{oops")
    with pytest.raises(RegistryError) as info:
        reg.get("vm-1")
    text = str(info.value)
    assert text.startswith(f"VM record {path} is corrupt (1 validation error for VmRecord); ")
    assert text.endswith("run `ironclaw gc`, which moves it aside")


def test_record_of_another_format_is_refused(reg: Registry) -> None:
    path = reg.record_path("vm-1")
    path.write_text(json.dumps(_record(format=RECORD_FORMAT + 1)))
    with pytest.raises(RegistryError) as info:
        reg.get("vm-1")
    assert str(info.value) == (
        f"VM record {path} has format {RECORD_FORMAT + 1}, this ironclaw reads format "
        f"{RECORD_FORMAT}; use the ironclaw version that wrote it"
    )


def test_record_naming_another_vm_is_refused(reg: Registry) -> None:
    path = reg.record_path("vm-1")
    path.write_text(json.dumps(_record(vm_id="vm-2")))
    with pytest.raises(RegistryError) as info:
        reg.get("vm-1")
    assert str(info.value) == (
        f"VM record {path} names VM 'vm-2', not its file name; it is corrupt: run `ironclaw "
        "gc`, which moves it aside"
    )


def test_unknown_keys_in_a_record_file_are_ignored(reg: Registry) -> None:
    """A newer writer's extra field does not make the record unreadable."""
    reg.record_path("vm-1").write_text(json.dumps(_record(future_field=1)))
    rec = reg.get("vm-1")
    assert rec is not None and rec.owner_pid == 1


def test_make_refuses_unknown_fields_listing_the_known_ones(reg: Registry) -> None:
    with pytest.raises(ConfigError) as info:
        reg.claim("vm-1", colour="red", size=1)
    text = str(info.value)
    assert text.startswith("VM vm-1: unknown registry field(s) ['colour', 'size']; known fields: [")
    assert "'owner_pid'" in text and "'tap'" in text
    assert "'vm_id'" not in text and "'format'" not in text  # not settable
    assert not reg.record_path("vm-1").exists()


def test_make_refuses_bad_values_naming_the_vm(reg: Registry) -> None:
    with pytest.raises(ConfigError, match=r"^VM vm-1: invalid registry record: "):
        reg.claim("vm-1", state="exploded")
    assert not reg.record_path("vm-1").exists()


def test_update_keeps_other_fields_and_the_id(reg: Registry) -> None:
    rec = reg.claim("vm-1", vcpus=2, memory_mb=256)
    new = reg.update("vm-1", state="running", vmm_pid=os.getpid())
    assert (new.vm_id, new.vcpus, new.memory_mb, new.state) == ("vm-1", 2, 256, "running")
    assert new.created_at == rec.created_at and new.owner_pid == rec.owner_pid


def test_record_model_defaults() -> None:
    rec = VmRecord.model_validate(_record())
    assert (rec.format, rec.state, rec.detached, rec.uplink) == (
        RECORD_FORMAT,
        "starting",
        False,
        False,
    )
    assert rec.created_at.tzinfo is not None


def test_record_that_is_not_utf8_is_corrupt_not_a_crash(reg: Registry) -> None:
    path = reg.record_path("vm-1")
    path.write_bytes(b'{"vm_id": "vm-1\xff", "owner_pid": 1, "owner_start_time": 2}')
    with pytest.raises(RegistryError, match=r"is corrupt \("):
        reg.get("vm-1")
