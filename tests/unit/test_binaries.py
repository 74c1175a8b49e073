"""Binary discovery order and version checks, with fake binaries."""

import os
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import (
    BinaryNotFoundError,
    ConfigError,
    JailerNotFoundError,
    VersionMismatchError,
)
from ironclaw_orchestrator.vm import binaries as b


def fake(tmp: Path, name: str, version: str) -> Path:
    path = tmp / name
    path.write_text(f"#!/bin/sh\necho '{name.split('-')[0].capitalize()} {version}'\n")
    path.chmod(0o755)
    return path


def test_version_parse_and_compare() -> None:
    v = b.Version.parse("Firecracker v1.0.0-44-gc73a27cb-dirty\n\nSupported ...")
    assert v.release == (1, 0, 0) and str(v) == "v1.0.0-44-gc73a27cb-dirty"
    assert b.Version.parse("Jailer v1.14.1") > v
    with pytest.raises(ValueError):
        b.Version.parse("nothing here")


def test_explicit_then_env_then_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = fake(tmp_path, "jailer-explicit", "v1.14.1")
    env = fake(tmp_path, "jailer-env", "v1.14.1")
    pathdir = tmp_path / "bin"
    pathdir.mkdir()
    on_path = fake(pathdir, "jailer", "v1.14.1")
    monkeypatch.setenv("PATH", str(pathdir))
    monkeypatch.setenv(b.JAILER_ENV, str(env))
    assert b.find_jailer(explicit) == explicit
    assert b.find_jailer() == env
    monkeypatch.delenv(b.JAILER_ENV)
    assert b.find_jailer() == on_path


def test_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(b.JAILER_ENV, raising=False)
    monkeypatch.setattr(b, "DEFAULT_JAILER_BINARY", tmp_path / "nope")
    with pytest.raises(JailerNotFoundError) as info:
        b.find_jailer()
    assert "jailer binary not found" in str(info.value) and "ironclaw install" in str(info.value)
    with pytest.raises(JailerNotFoundError, match="from \\$IRONCLAW_JAILER"):
        monkeypatch.setenv(b.JAILER_ENV, str(tmp_path / "missing"))
        b.find_jailer()


def test_version_mismatch(tmp_path: Path) -> None:
    j = fake(tmp_path, "jailer", "v1.14.1")
    f = fake(tmp_path, "firecracker", "v1.13.0")
    with pytest.raises(VersionMismatchError) as info:
        b.check_pair(j, f)
    assert "v1.14.1" in str(info.value) and "v1.13.0" in str(info.value)


def test_matching_pair(tmp_path: Path) -> None:
    j = fake(tmp_path, "jailer", "v1.14.1")
    f = fake(tmp_path, "firecracker-v1.14.1", "v1.14.1")
    assert b.check_pair(j, f).version.release == (1, 14, 1)


def test_exec_name_rule_for_middle_versions(tmp_path: Path) -> None:
    j = fake(tmp_path, "jailer", "v1.5.0")
    f = fake(tmp_path, "vmm", "v1.5.0")
    with pytest.raises(ConfigError, match=r"must|requires"):
        b.check_pair(j, f)
    b.check_exec_file_name(Path("vmm"), b.Version(1, 14, 1))  # allowed again in v1.13+


def test_exec_file_name_rule_applies_to_the_resolved_file(tmp_path: Path) -> None:
    """The jailer resolves symlinks before checking the name: so do we."""
    (tmp_path / "vmm-v1.5.0").write_text("")
    (tmp_path / "firecracker").symlink_to("vmm-v1.5.0")
    with pytest.raises(ConfigError, match=r"resolved name 'vmm-v1\.5\.0'"):
        b.check_exec_file_name(tmp_path / "firecracker", b.Version(1, 5, 0))
    (tmp_path / "firecracker-v1.5.0").write_text("")
    (tmp_path / "fc").symlink_to("firecracker-v1.5.0")
    b.check_exec_file_name(tmp_path / "fc", b.Version(1, 5, 0))


def test_not_a_firecracker(tmp_path: Path) -> None:
    path = tmp_path / "jailer"
    path.write_text("#!/bin/sh\necho hello\n")
    os.chmod(path, 0o755)
    with pytest.raises(BinaryNotFoundError, match="no Firecracker version"):
        b.read_version(path)
