"""The id rule and every id-derived name have one home (ironclaw_orchestrator.names)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ironclaw_orchestrator import names
from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig

SRC = Path(__file__).resolve().parents[2] / "src" / "ironclaw_orchestrator"


@pytest.mark.parametrize("good", ["a", "vm-1", "X" * 64, "-"])
def test_valid_ids(good: str) -> None:
    assert names.is_valid_id(good) and names.check_id(good) == good


@pytest.mark.parametrize("bad", ["", "vm-1\n", "vm\n1", "a/b", "ü", "x" * 65, "a_b", " a"])
def test_invalid_ids_everywhere(bad: str, tmp_path: Path) -> None:
    """A trailing newline passed `re.match(...$)`; now every entry point refuses it."""
    assert not names.is_valid_id(bad)
    with pytest.raises(ConfigError, match="is invalid"):
        names.check_id(bad)
    with pytest.raises(ConfigError):
        VmConfig(vm_id=bad)
    with pytest.raises(ConfigError):
        JailerConfig(jailer_id=bad)
    with pytest.raises(ConfigError):
        Registry(tmp_path / "state").record_path(bad)


def test_non_strings_are_not_ids() -> None:
    assert not names.is_valid_id(None) and not names.is_valid_id(12)


def test_the_id_rule_lives_only_in_names() -> None:
    """Copies of the rule drifted apart once (re.match vs fullmatch): there is one now."""
    copies = [
        p.relative_to(SRC)
        for p in SRC.rglob("*.py")
        if re.search(r"A-Za-z0-9-\]\{1,64\}", p.read_text()) and p.name != "names.py"
    ]
    assert copies == []


def test_exec_file_name_resolves_like_the_jailer(tmp_path: Path) -> None:
    real = tmp_path / "firecracker-v1.0.0"
    real.write_text("")
    (tmp_path / "firecracker").symlink_to("firecracker-v1.0.0")  # what `ironclaw install` lays out
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "fc").symlink_to(tmp_path / "firecracker")  # a chain of links
    for path in (real, tmp_path / "firecracker", tmp_path / "bin" / "fc"):
        assert names.exec_file_name(path) == "firecracker-v1.0.0"


def test_jail_paths_follow_the_resolved_exec_file(tmp_path: Path) -> None:
    (tmp_path / "firecracker-v1.0.0").write_text("")
    (tmp_path / "firecracker").symlink_to("firecracker-v1.0.0")
    cfg = JailerConfig(
        exec_file=tmp_path / "firecracker", jailer_id="vm-1", chroot_base_dir=Path("/var/jail")
    )
    jail = Path("/var/jail/firecracker-v1.0.0/vm-1")
    assert cfg.exec_file_name == "firecracker-v1.0.0"
    assert cfg.jail_dir == jail == names.jail_dir(Path("/var/jail"), "firecracker-v1.0.0", "vm-1")
    assert cfg.api_socket_path == jail / "root/run/firecracker.socket"
    assert names.pid_file(jail) == jail / "root/firecracker-v1.0.0.pid"
    assert names.process_name("firecracker-v1.0.0") == "firecracker-v1."  # comm: 15 bytes


def test_other_derived_names(tmp_path: Path) -> None:
    assert names.vm_run_dir(tmp_path, "vm-1") == tmp_path / "vms" / "vm-1"
    assert names.vm_cgroup_path("/a/ironclaw/", "vm-1") == "a/ironclaw/vm-1"
    assert names.netns_name("vm-1") == "ironclaw-vm-1"
    assert names.id_from_netns("ironclaw-vm-1") == "vm-1"
    assert names.id_from_netns("ironclaw-bad_id") is None
    assert names.id_from_netns("docker-1") is None
    with pytest.raises(ConfigError):
        names.vm_run_dir(tmp_path, "../etc")
    assert os.sep not in names.tap_name("vm-1")
