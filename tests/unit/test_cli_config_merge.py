"""``--config`` and flags: validated together, and a detached VM gets only what was set."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from standin_host import StandinHost, make_refusal_host
from typer.testing import CliRunner

from ironclaw_orchestrator import supervisor
from ironclaw_orchestrator.cli import app
from ironclaw_orchestrator.cli.common import ExitCode, load_toml
from ironclaw_orchestrator.cli.vm import build_config
from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.registry import STATE_DIR_ENV, Registry
from ironclaw_orchestrator.vm.config import DEFAULT_MEMORY_HEADROOM_MIB, VmConfig

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRONCLAW_CACHE_DIR", str(tmp_path / "probe-cache"))
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.delenv("IRONCLAW_REQUIRE_SANDBOX", raising=False)
    monkeypatch.delenv("IRONCLAW_IMAGE_DIRS", raising=False)


def test_a_flag_overrides_a_bad_value_in_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "vm.toml"
    cfg.write_text("memory_mb = 64\nvcpu_count = 2\n")
    config, _ = build_config(config_file=cfg, overrides={"memory_mb": 256}, probe=None)
    assert (config.memory_mb, config.vcpu_count) == (256, 2)
    with pytest.raises(ConfigError) as info:
        build_config(config_file=cfg, overrides={}, probe=None)
    assert "memory_mb" in str(info.value) and str(cfg) in str(info.value)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    """For ``vm run`` refusals: should one break, the VM starts on the stand-in host."""
    yield from make_refusal_host(monkeypatch)


def test_file_and_flags_are_checked_together(tmp_path: Path, host: StandinHost) -> None:
    """Each is fine alone; together the memory limit is below guest memory + overhead."""
    cfg = tmp_path / "vm.toml"
    cfg.write_text("[jailer]\nmemory_limit_mb = 300\n")
    build_config(config_file=cfg, overrides={}, probe=None)
    result = runner.invoke(app, ["vm", "run", "-c", str(cfg), "--memory", "512"])
    assert result.exit_code == ExitCode.USAGE
    assert "jailer.memory_limit_mb" in result.output and str(cfg) in result.output
    assert host.made() == []


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vmlinux").write_bytes(b"k")
    cfg = tmp_path / "vm.toml"
    cfg.write_text('kernel_path = "vmlinux"\n[jailer]\nchroot_base_dir = "jails"\n')
    config, _ = build_config(config_file=cfg, overrides={}, probe=None)
    assert config.kernel_path == str(tmp_path / "vmlinux")
    assert config.jailer_config().chroot_base_dir == tmp_path / "jails"
    assert config.jailer_config().jail_dir.is_absolute()


def test_non_utf8_toml_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "latin1.toml"
    cfg.write_bytes(b'boot_args = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_toml(cfg)


class _FakeSupervisor:
    """Stands in for the supervisor process: loads the handed-over config the way the real
    supervisor does, then reports an error (so nothing runs)."""

    seen: ClassVar[list[VmConfig]] = []

    def __init__(self, argv: list[str], **kwargs: Any) -> None:
        state_dir, vm_id, name, fd = argv[3], argv[4], argv[5], int(argv[6])
        self.raw = json.loads((Path(state_dir) / name).read_text())
        _FakeSupervisor.seen.append(supervisor._load_config(Registry(Path(state_dir)), vm_id, name))
        msg = {"event": "error", "type": "VmError", "message": "fake supervisor"}
        os.write(fd, json.dumps(msg).encode() + b"\n")
        self.pid = os.getpid()
        self.returncode = 1

    def wait(self, timeout: float | None = None) -> int:
        return 1

    def poll(self) -> int:
        return 1


def test_detached_start_hands_over_only_what_was_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "vm.toml"
    cfg.write_text('[jailer]\nchroot_base_dir = "/srv/j"\nno_file = 4096\n')
    _FakeSupervisor.seen.clear()
    monkeypatch.setattr(subprocess, "Popen", _FakeSupervisor)
    result = runner.invoke(app, ["vm", "start", "-d", "--config", str(cfg), "--id", "web-7"])
    assert result.exit_code == ExitCode.VM_ERROR and "fake supervisor" in result.output
    [config] = _FakeSupervisor.seen
    assert config.jailer is not None
    assert config.jailer.model_fields_set == {"chroot_base_dir", "no_file"}
    derived = config.jailer_config()
    # Not JailerConfig's defaults (jail id "ironclaw-vm", 256 MiB): derived from the VM.
    assert derived.jailer_id == "web-7"
    assert derived.memory_limit_mb == config.memory_mb + DEFAULT_MEMORY_HEADROOM_MIB
    assert "jailer_binary" not in derived.model_fields_set
    assert "exec_file" not in derived.model_fields_set
    assert not list((tmp_path / "state").glob(f"{supervisor.CONFIG_PREFIX}*"))
