"""``ironclaw vm pause|resume|snapshot|restore``: argument handling and errors (no VMs)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from standin_host import StandinHost, make_refusal_host
from typer.testing import CliRunner, Result

from ironclaw_orchestrator.cli import app
from ironclaw_orchestrator.cli.snapshot import record_config
from ironclaw_orchestrator.registry import STATE_DIR_ENV, Registry

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's --state-dir sets the environment in this process: restore it afterwards."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "unused-state"))


def invoke(state: Path, *args: str) -> Result:
    return runner.invoke(app, ["--state-dir", str(state), *args], env={"COLUMNS": "200"})


@pytest.mark.parametrize("command", ["pause", "resume", "snapshot", "restore"])
def test_commands_are_registered(command: str) -> None:
    result = runner.invoke(app, ["vm", command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--json" in result.output


def test_unknown_vm_is_a_usage_error(tmp_path: Path) -> None:
    for args in (["vm", "pause", "nope"], ["vm", "snapshot", "nope", str(tmp_path / "s")]):
        result = invoke(tmp_path / "state", *args)
        assert result.exit_code == 2, result.output
        assert "no VM 'nope'" in result.output
    assert not (tmp_path / "s").exists()


def test_vm_without_live_vmm_is_refused(tmp_path: Path) -> None:
    Registry(tmp_path / "state").claim("idle-1", config={})  # a record, no VMM yet
    result = invoke(tmp_path / "state", "vm", "resume", "idle-1")
    assert result.exit_code == 2 and "is not running" in result.output


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    """For restore refusals: should one break, the clone starts on the stand-in host (the
    detached one too: its supervisor joins it, see ``standin/boot``)."""
    yield from make_refusal_host(monkeypatch)


def test_restore_of_a_non_snapshot_starts_nothing(tmp_path: Path, host: StandinHost) -> None:
    (tmp_path / "junk").mkdir()
    result = invoke(host.state, "vm", "restore", str(tmp_path / "junk"), "--id", "r-1")
    assert result.exit_code == 2, result.output
    assert "manifest.json missing" in result.output
    assert Registry(host.state).get("r-1") is None
    assert host.made() == []


def test_detached_restore_of_a_non_snapshot_starts_nothing(
    tmp_path: Path, host: StandinHost
) -> None:
    """-d: the supervisor verifies the snapshot, its error comes back, nothing is left."""
    (tmp_path / "junk").mkdir()
    state = host.state
    result = invoke(state, "vm", "restore", str(tmp_path / "junk"), "--id", "r-2", "-d")
    assert result.exit_code == 2, result.output
    assert "manifest.json missing" in result.output
    assert Registry(state).list() == []
    assert sorted(p.name for p in state.iterdir() if not p.name.startswith(".lock")) == []
    assert host.made() == []


def test_record_config_drops_host_specific_jail_settings() -> None:
    from ironclaw_orchestrator.registry import VmRecord
    from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig

    cfg = VmConfig(
        vm_id="a", kernel_path="/k", rootfs_path=None, jailer=JailerConfig(cpu_limit=0.5)
    )
    dumped = cfg.model_dump(mode="json")
    dumped["jailer"].update(uid=64005, gid=64005, exec_file="/opt/fc", jailer_id="a")
    record = VmRecord(vm_id="a", owner_pid=os.getpid(), owner_start_time=1, config=dumped)
    rebuilt = record_config(record)
    assert rebuilt.jailer is not None
    assert rebuilt.jailer.model_dump(exclude_unset=True) == {"cpu_limit": 0.5}


def test_detached_restore_hands_the_supervisor_a_restore_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """-d: the supervisor gets {"restore": ...} (absolute snapshot path, resume flag), reads
    it back as a RestoreRequest and deletes the file; its error comes back to the CLI."""
    import json
    import subprocess
    from typing import Any

    from ironclaw_orchestrator import supervisor
    from ironclaw_orchestrator.detach import RestoreRequest

    seen: list[object] = []

    class FakeSupervisor:
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            state_dir, vm_id, name, fd = argv[3], argv[4], argv[5], int(argv[6])
            seen.append(supervisor._load_config(Registry(Path(state_dir)), vm_id, name))
            msg = {"event": "error", "type": "ConfigError", "message": "fake supervisor"}
            os.write(fd, json.dumps(msg).encode() + b"\n")
            self.pid, self.returncode = os.getpid(), 1

        def wait(self, timeout: float | None = None) -> int:
            return 1

        def poll(self) -> int:
            return 1

    monkeypatch.setattr(subprocess, "Popen", FakeSupervisor)
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    result = invoke(state, "vm", "restore", "snap", "--id", "r-3", "-d", "--paused")
    assert result.exit_code == 2 and "fake supervisor" in result.output
    assert seen == [RestoreRequest(snapshot_dir=str(tmp_path / "snap"), resume=False)]
    assert not list(state.glob(f"{supervisor.CONFIG_PREFIX}*"))


def test_snapshot_base_needs_diff(tmp_path: Path) -> None:
    result = invoke(tmp_path / "state", "vm", "snapshot", "vm-1", str(tmp_path / "s"), "--base",
                    str(tmp_path / "b"))  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "add --diff" in result.output
    assert not (tmp_path / "s").exists()


def test_snapshot_diff_is_documented() -> None:
    result = runner.invoke(app, ["vm", "snapshot", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--diff" in result.output and "--base" in result.output
