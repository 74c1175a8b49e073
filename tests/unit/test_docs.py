"""The docs site's generated parts: the CLI reference covers every command; new pages get a
nav entry; README sections the docs include still exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import typer

from ironclaw_orchestrator.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "ironclaw_docs", ROOT / "docs/hooks/ironclaw_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _command_paths(cmd: object, prefix: str) -> list[str]:
    paths = [prefix]
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            paths += _command_paths(sub, f"{prefix} {name}")
    return paths


def test_cli_reference_has_every_command_and_option() -> None:
    text = _hooks().cli_reference()
    headings = re.findall(r"^#+ `(.+)`$", text, re.M)
    assert sorted(headings) == sorted(_command_paths(typer.main.get_command(app), "ironclaw"))
    for option in ("--state-dir", "--version", "--dry-run", "--no-jailer", "--require-sandbox"):
        assert f"`{option}" in text or f", {option}" in text, option


def test_pages_missing_from_the_nav_are_appended(tmp_path: Path) -> None:
    (tmp_path / "index.md").write_text("# x")
    (tmp_path / "agent-protocol.md").write_text("# y")
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "notes.md").write_text("# not a page")
    config = {"docs_dir": str(tmp_path), "nav": [{"Home": "index.md"}]}
    out = _hooks().on_config(config)
    assert out["nav"] == [{"Home": "index.md"}, {"More": ["agent-protocol.md"]}]


def test_readme_sections_included_by_the_docs_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in (ROOT / "docs").rglob("*.md"):
        for section in re.findall(r'--8<-- "README\.md:(\w+)"', page.read_text()):
            assert f"<!-- --8<-- [start:{section}] -->" in readme, (page, section)
            assert f"<!-- --8<-- [end:{section}] -->" in readme, (page, section)
