"""The package's public face: version, ``__all__`` (lazily imported) and ``ironclaw --version``."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ironclaw_orchestrator as pkg
from ironclaw_orchestrator.cli import app


def test_version_comes_from_the_package_metadata() -> None:
    assert pkg.__version__ == version("ironclaw-orchestrator")


def test_every_public_name_resolves_and_all_matches_the_export_table() -> None:
    assert set(pkg.__all__) == set(pkg._EXPORTS)
    for name in pkg.__all__:
        assert getattr(pkg, name) is not None
    assert set(pkg.__all__) <= set(dir(pkg))
    from ironclaw_orchestrator.vm import start_firecracker

    assert pkg.start_firecracker is start_firecracker


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = pkg.no_such_name  # type: ignore[attr-defined]


def test_importing_the_package_root_loads_nothing_heavy() -> None:
    code = (
        "import sys, ironclaw_orchestrator as p\n"
        "def ours(): return sorted(m for m in sys.modules if m.split('.')[0] in "
        "('httpx', 'pydantic', 'pyroute2', 'psutil', 'typer', 'rich') "
        "or m.startswith('ironclaw_orchestrator.'))\n"
        "print(ours()); p.__version__; print(ours())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "['ironclaw_orchestrator.version']"]


def _fake_binary(path: Path, text: str) -> Path:
    path.write_text(f"#!/bin/sh\necho '{text}'\n")
    path.chmod(0o755)
    return path


def test_cli_version_names_binaries_and_their_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fc = _fake_binary(tmp_path / "firecracker", "Firecracker v1.14.1")
    jl = _fake_binary(tmp_path / "jailer", "Jailer v1.14.1")
    monkeypatch.setenv("IRONCLAW_FIRECRACKER", str(fc))
    monkeypatch.setenv("IRONCLAW_JAILER", str(jl))
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"ironclaw-orchestrator {pkg.__version__}"
    assert lines[1] == f"firecracker: v1.14.1 ({fc})"
    assert lines[2] == f"jailer: v1.14.1 ({jl})"


def test_cli_version_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRONCLAW_FIRECRACKER", str(tmp_path / "nope-fc"))
    monkeypatch.setenv("IRONCLAW_JAILER", str(tmp_path / "nope-jl"))
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert "firecracker: not found" in result.output and "IRONCLAW_FIRECRACKER" in result.output
    assert "jailer: not found" in result.output and "IRONCLAW_JAILER" in result.output
