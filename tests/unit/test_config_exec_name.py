"""JailerConfig.exec_file_name: resolved once per config, anew for each VM's config."""

from __future__ import annotations

import os
from pathlib import Path

from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig


def _binaries(tmp_path: Path) -> Path:
    for name in ("firecracker-v1.0.0", "firecracker-v1.14.1"):
        (tmp_path / name).write_bytes(b"")
    link = tmp_path / "firecracker"
    link.symlink_to("firecracker-v1.0.0")
    return link


def _repoint(link: Path, target: str) -> None:
    tmp = link.with_name(".fc.tmp")
    tmp.symlink_to(target)
    os.replace(tmp, link)  # what an upgrade does


def test_a_config_keeps_the_name_it_resolved_while_a_new_vm_gets_the_new_one(
    tmp_path: Path,
) -> None:
    link = _binaries(tmp_path)
    vm = VmConfig(vm_id="a", jailer=JailerConfig(exec_file=str(link)))
    running = vm.jailer_config()
    assert running.jail_dir == Path("/var/jail/firecracker-v1.0.0/a")

    _repoint(link, "firecracker-v1.14.1")
    # The running VM's jail does not move under it...
    assert running.exec_file_name == "firecracker-v1.0.0"
    assert running.api_socket_path.parts[3] == "firecracker-v1.0.0"
    # ...and the next VM started from the same config follows the jailer's resolution.
    assert vm.jailer_config().jail_dir == Path("/var/jail/firecracker-v1.14.1/a")


def test_a_resolved_name_is_not_inherited_by_a_derived_config(tmp_path: Path) -> None:
    link = _binaries(tmp_path)
    template = JailerConfig(exec_file=str(link))
    assert template.exec_file_name == "firecracker-v1.0.0"  # cached on the template
    _repoint(link, "firecracker-v1.14.1")
    derived = VmConfig(vm_id="b", jailer=template).jailer_config()
    assert derived.exec_file_name == "firecracker-v1.14.1"


def test_reassigning_exec_file_resolves_again(tmp_path: Path) -> None:
    link = _binaries(tmp_path)
    cfg = JailerConfig(exec_file=str(link))
    assert cfg.exec_file_name == "firecracker-v1.0.0"
    cfg.exec_file = tmp_path / "firecracker-v1.14.1"
    assert cfg.exec_file_name == "firecracker-v1.14.1"


def test_the_cache_is_not_part_of_equality_or_the_dump(tmp_path: Path) -> None:
    link = _binaries(tmp_path)
    asked = JailerConfig(exec_file=str(link))
    _ = asked.jail_dir
    fresh = JailerConfig(exec_file=str(link))
    assert asked == fresh
    assert asked.model_dump() == fresh.model_dump()
    assert "exec_file_name" not in asked.model_dump()


def test_a_copy_with_another_exec_file_resolves_it(tmp_path: Path) -> None:
    """The start path copies the config with the binary it found (``model_copy(update=)``):
    the jail must be named after that binary, not after the default path asked earlier."""
    link = _binaries(tmp_path)
    cfg = JailerConfig(exec_file=tmp_path / "firecracker-v1.14.1")
    assert cfg.exec_file_name == "firecracker-v1.14.1"
    found = cfg.model_copy(update={"exec_file": link})
    assert found.exec_file_name == "firecracker-v1.0.0"
    assert found.jail_dir.parent.name == "firecracker-v1.0.0"
    assert cfg.model_copy().exec_file_name == "firecracker-v1.14.1"  # same file: kept
