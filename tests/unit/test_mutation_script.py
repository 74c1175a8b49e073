"""scripts/mutation.py stays in step with the code it mutates (without running mutmut)."""

from __future__ import annotations

import fnmatch
import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "ironclaw_orchestrator"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts/mutation.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_targets_match_pyproject(script: ModuleType) -> None:
    script.check_config()  # exits with the mismatch otherwise


def test_every_target_function_exists(script: ModuleType) -> None:
    for target in script.TARGETS:
        text = (SRC / target.path).read_text()
        for fn in target.functions:
            assert f"def {fn.rpartition('.')[2]}(" in text, (target.path, fn)


def test_globs_name_mutmut_keys(script: ModuleType) -> None:
    m = script
    registry = m.Target("registry", "registry.py", ("check_vm_id", "Registry._read"))
    globs = registry.globs()
    key = "ironclaw_orchestrator.registry.x_check_vm_id__mutmut_3"
    assert any(fnmatch.fnmatchcase(key, g) for g in globs)
    assert any(
        fnmatch.fnmatchcase("ironclaw_orchestrator.registry.xǁRegistryǁ_read__mutmut_12", g)
        for g in globs
    )
    assert not any(
        fnmatch.fnmatchcase("ironclaw_orchestrator.registry.xǁRegistryǁclaim__mutmut_1", g)
        for g in globs
    )
    whole = m.Target("names", "names.py")
    assert whole.globs() == ["ironclaw_orchestrator.names.x*__mutmut_*"]


def test_equivalent_entries_are_complete_and_in_scope(script: ModuleType) -> None:
    data = tomllib.loads((ROOT / "scripts/mutation_equivalent.toml").read_text())
    globs = [g for t in script.TARGETS for g in t.globs()]
    seen = set()
    for entry in data["equivalent"]:
        assert set(entry) == {"mutant", "change", "reason"}, entry
        assert entry["change"] and entry["reason"], entry
        assert entry["mutant"] not in seen, entry
        seen.add(entry["mutant"])
        assert any(fnmatch.fnmatchcase(entry["mutant"], g) for g in globs), entry
