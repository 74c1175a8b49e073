"""The ``ironclaw`` command line, through typer's CliRunner (no root, no VMs)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from standin_host import StandinHost, make_refusal_host
from typer.testing import CliRunner

from ironclaw_orchestrator import doctor as doctor_lib
from ironclaw_orchestrator.cli import app
from ironclaw_orchestrator.cli.common import (
    ExitCode,
    exit_code_for,
    load_toml,
    merge_overrides,
)
from ironclaw_orchestrator.cli.vm import Probe, build_config
from ironclaw_orchestrator.errors import (
    ApiError,
    BinaryNotFoundError,
    CgroupControllerUnavailableError,
    ChrootBaseError,
    CleanupError,
    ConfigError,
    InstallError,
    IronclawError,
    JailerError,
    KvmUnavailableError,
    NetworkError,
    OutOfMemoryError,
    SandboxRequiredError,
    StagingError,
    UsageError,
    VersionMismatchError,
    VmExitedError,
)
from ironclaw_orchestrator.vm.probe import ProbeBehaviour

runner = CliRunner()


@pytest.fixture(autouse=True)
def _probe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe kernels built by build_config go to a private directory."""
    monkeypatch.setenv("IRONCLAW_CACHE_DIR", str(tmp_path / "probe-cache"))
    monkeypatch.delenv("IRONCLAW_REQUIRE_SANDBOX", raising=False)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    """For ``vm run`` refusals: should one break, the VM starts on the stand-in host."""
    yield from make_refusal_host(monkeypatch)


@pytest.mark.parametrize(
    "argv",
    [[], ["doctor"], ["install"], ["vm"], ["vm", "run"]],
    ids=["ironclaw", "doctor", "install", "vm", "vm-run"],
)
def test_help_for_every_command(argv: list[str]) -> None:
    result = runner.invoke(app, [*argv, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert "Example" in result.output
    assert "Traceback" not in result.output


def test_no_arguments_shows_help() -> None:
    result = runner.invoke(app, [])
    assert "Usage:" in result.output


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_bad_toml_key_names_key_and_file(tmp_path: Path, host: StandinHost) -> None:
    cfg = write(
        tmp_path / "vm.toml",
        """
        vm_id = "ok-1"
        bogus_key = 1
        [jailer]
        not_a_jailer_field = 2
        """,
    )
    result = runner.invoke(app, ["vm", "run", "--config", str(cfg)])
    assert result.exit_code == ExitCode.USAGE
    assert "bogus_key" in result.output
    assert "jailer.not_a_jailer_field" in result.output
    assert str(cfg) in result.output
    assert "Traceback" not in result.output
    assert host.made() == []


def test_bad_toml_value_names_key(tmp_path: Path, host: StandinHost) -> None:
    cfg = write(tmp_path / "vm.toml", 'vcpu_count = 0\n[jailer]\ncpuset_cpus = "3-1"\n')
    result = runner.invoke(app, ["vm", "run", "-c", str(cfg)])
    assert result.exit_code == ExitCode.USAGE
    assert "vcpu_count" in result.output
    assert "jailer.cpuset_cpus" in result.output
    assert str(cfg) in result.output
    assert host.made() == []


def test_invalid_toml_syntax(tmp_path: Path, host: StandinHost) -> None:
    cfg = write(tmp_path / "broken.toml", "vm_id = \n")
    result = runner.invoke(app, ["vm", "run", "--config", str(cfg)])
    assert result.exit_code == ExitCode.USAGE
    assert "not valid TOML" in result.output
    assert str(cfg) in result.output
    assert host.made() == []


def test_missing_config_file(tmp_path: Path, host: StandinHost) -> None:
    result = runner.invoke(app, ["vm", "run", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == ExitCode.USAGE
    assert "does not exist" in result.output
    assert host.made() == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--vcpus", "0"], "vcpu_count"),
        (["--vcpus", "99"], "vcpu_count"),
        (["--memory", "16"], "memory_mb"),
        (["--id", "bad/id"], "vm_id"),
        (["--boot-args", "a\nb"], "boot_args"),
        (["--no-jailer", "--require-sandbox"], "--no-jailer"),
        (["--kernel", "/bin/true", "--probe", "halt"], "--probe"),
    ],
)
def test_bad_flag_values_are_usage_errors(argv: list[str], needle: str, host: StandinHost) -> None:
    result = runner.invoke(app, ["vm", "run", *argv])
    assert result.exit_code == ExitCode.USAGE, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert host.made() == []


@pytest.mark.parametrize("argv", [["--vcpus", "two"], ["--probe", "explode"], ["--bogus"]])
def test_unparseable_flags_exit_2(argv: list[str]) -> None:
    result = runner.invoke(app, ["vm", "run", *argv])
    assert result.exit_code == 2


def test_flags_override_file(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "vm.toml",
        """
        vm_id = "from-file"
        memory_mb = 256
        vcpu_count = 2
        [jailer]
        chroot_base_dir = "/srv/jail"
        """,
    )
    config, behaviour = build_config(
        config_file=cfg, overrides={"vm_id": "from-flag", "memory_mb": None}, probe=None
    )
    assert config.vm_id == "from-flag"
    assert config.memory_mb == 256
    assert config.vcpu_count == 2
    assert config.jailer is not None
    assert config.jailer.chroot_base_dir == Path("/srv/jail")
    assert behaviour is ProbeBehaviour.RESET
    assert config.rootfs_path is None
    assert Path(config.kernel_path).is_file()


def test_probe_defaults_and_kernel_from_file(tmp_path: Path) -> None:
    config, behaviour = build_config(config_file=None, overrides={}, probe=None)
    assert behaviour is ProbeBehaviour.RESET
    assert config.memory_mb == 128
    assert config.vm_id.startswith("ironclaw-run-")
    cfg = write(tmp_path / "k.toml", 'kernel_path = "/boot/vmlinux"\n')
    config, behaviour = build_config(config_file=cfg, overrides={}, probe=None)
    assert behaviour is None
    assert config.kernel_path == "/boot/vmlinux"
    assert config.rootfs_path is None
    with pytest.raises(ConfigError, match="--probe"):
        build_config(config_file=cfg, overrides={}, probe=Probe.halt)


def test_merge_overrides_jailer_keys() -> None:
    merged = merge_overrides(
        {"vm_id": "a", "jailer": {"uid": 5}},
        {"vm_id": "b", "memory_mb": None, "jailer.gid": 6},
    )
    assert merged == {"vm_id": "b", "jailer": {"uid": 5, "gid": 6}}


def test_load_toml_reports_file(tmp_path: Path) -> None:
    bad = write(tmp_path / "x.toml", "[[[")
    with pytest.raises(ConfigError, match=r"x\.toml"):
        load_toml(bad)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("x"), ExitCode.USAGE),
        (UsageError("x"), ExitCode.USAGE),
        (KvmUnavailableError("x"), ExitCode.HOST_NOT_READY),
        (BinaryNotFoundError("x"), ExitCode.HOST_NOT_READY),
        (VersionMismatchError("x"), ExitCode.HOST_NOT_READY),
        (SandboxRequiredError("x"), ExitCode.HOST_NOT_READY),
        (ChrootBaseError("x"), ExitCode.HOST_NOT_READY),
        (CgroupControllerUnavailableError("x"), ExitCode.HOST_NOT_READY),
        (OutOfMemoryError("x"), ExitCode.OOM_KILLED),
        (VmExitedError("x"), ExitCode.VM_ERROR),
        (JailerError("x"), ExitCode.VM_ERROR),
        (ApiError("x"), ExitCode.VM_ERROR),
        (StagingError("x"), ExitCode.VM_ERROR),
        (NetworkError("x"), ExitCode.VM_ERROR),
        (InstallError("x"), ExitCode.INSTALL_FAILED),
        (CleanupError("x", ["a"]), ExitCode.CLEANUP_FAILED),
        (IronclawError("x"), ExitCode.VM_ERROR),
    ],
)
def test_exit_code_mapping(exc: IronclawError, code: ExitCode) -> None:
    assert exit_code_for(exc) == code


def test_exit_codes_are_stable() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0,
        "VM_ERROR": 1,
        "USAGE": 2,
        "HOST_NOT_READY": 3,
        "OOM_KILLED": 4,
        "INSTALL_FAILED": 5,
        "CLEANUP_FAILED": 6,
        "INTERRUPTED": 130,
        "OUTPUT_CLOSED": 141,
        "TERMINATED": 143,
    }


def _fake_report(fail: bool) -> doctor_lib.DoctorReport:
    S = doctor_lib.Status
    checks = [
        doctor_lib.Check("kvm", S.PASS, "/dev/kvm is readable and writable"),
        doctor_lib.Check("socket path budget", S.WARN, "114 of 107 bytes", "shorten ids"),
        doctor_lib.Check(
            "live boot (jailed)",
            S.FAIL if fail else S.PASS,
            "spawn->API 1 ms",
            "",
            {"spawn_to_api_ready_ms": 1.0},
        ),
    ]
    return doctor_lib.DoctorReport(checks)


@pytest.mark.parametrize("fail", [False, True])
def test_doctor_json_shape(monkeypatch: pytest.MonkeyPatch, fail: bool) -> None:
    seen: dict[str, object] = {}

    async def fake_run_checks(
        config: object = None, *, live: bool = False, live_unjailed: bool = False
    ) -> doctor_lib.DoctorReport:
        seen.update(live=live, live_unjailed=live_unjailed)
        return _fake_report(fail)

    monkeypatch.setattr(doctor_lib, "run_checks", fake_run_checks)
    result = runner.invoke(app, ["doctor", "--json", "--unjailed"])
    assert result.exit_code == (ExitCode.HOST_NOT_READY if fail else ExitCode.OK)
    doc = json.loads(result.stdout)
    assert doc["ok"] is (not fail)
    assert doc["summary"] == {"pass": 2 - fail, "warn": 1, "fail": int(fail)}
    assert [c["name"] for c in doc["checks"]] == ["kvm", "socket path budget", "live boot (jailed)"]
    for check in doc["checks"]:
        assert set(check) == {"name", "status", "value", "fix", "details"}
        assert check["status"] in ("pass", "warn", "fail")
    assert doc["checks"][2]["details"] == {"spawn_to_api_ready_ms": 1.0}
    assert seen == {"live": True, "live_unjailed": True}


def test_doctor_table_and_no_live(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    async def fake_run_checks(
        config: object = None, *, live: bool = False, live_unjailed: bool = False
    ) -> doctor_lib.DoctorReport:
        seen.update(live=live)
        return _fake_report(False)

    monkeypatch.setattr(doctor_lib, "run_checks", fake_run_checks)
    result = runner.invoke(app, ["doctor", "--no-live"])
    assert result.exit_code == 0
    assert "socket path budget" in result.output
    assert "WARN" in result.output
    assert seen == {"live": False}


def test_doctor_bad_jailer_table(tmp_path: Path) -> None:
    cfg = write(tmp_path / "d.toml", "[jailer]\nuid = 0\n")
    result = runner.invoke(app, ["doctor", "--config", str(cfg), "--no-live"])
    assert result.exit_code == ExitCode.USAGE
    assert "uid" in result.output
    assert str(cfg) in result.output


def test_install_error_is_exit_5(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["install", "--version", "not-a-version", "--prefix", str(tmp_path / "bin")],
    )
    assert result.exit_code == ExitCode.INSTALL_FAILED, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "bin").exists()


def test_library_never_imports_typer_or_rich() -> None:
    code = textwrap.dedent(
        """
        import importlib, sys
        from pathlib import Path
        import ironclaw_orchestrator as pkg
        root = Path(pkg.__file__).parent
        names = []
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root.parent).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts[-1] == "__main__" or parts[1:2] == ["cli"]:
                continue
            name = ".".join(parts)
            importlib.import_module(name)
            names.append(name)
        assert "ironclaw_orchestrator.doctor" in names, names
        assert "ironclaw_orchestrator.vm.jailer" in names, names
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("typer", "rich", "click"))
        print(bad)
        sys.exit(1 if bad else 0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
