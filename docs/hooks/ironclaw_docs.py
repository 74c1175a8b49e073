"""mkdocs hooks: the CLI reference generated from the real ``ironclaw`` command tree, and a
nav that also lists pages added to docs/ without editing mkdocs.yml.

``<!-- ironclaw-cli-reference -->`` in a page is replaced by one section per command: usage,
help text and a table of its options, taken from the typer/click objects themselves, so the
reference cannot drift from the CLI.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import typer

MARKER = "<!-- ironclaw-cli-reference -->"
EXTRA_SECTION = "More"


def _nav_files(nav: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(nav, str):
        found.add(nav)
    elif isinstance(nav, list):
        for item in nav:
            found |= _nav_files(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            found |= _nav_files(value)
    return found


def on_config(config: Any) -> Any:
    """Append pages that exist in docs/ but are not in the nav (others add pages too)."""
    nav = config.get("nav")
    if not nav:
        return config
    docs = Path(config["docs_dir"])
    listed = _nav_files(nav)
    extra = sorted(
        str(p.relative_to(docs))
        for p in docs.rglob("*.md")
        if "hooks" not in p.relative_to(docs).parts and str(p.relative_to(docs)) not in listed
    )
    if extra:
        config["nav"] = [*nav, {EXTRA_SECTION: extra}]
    return config


def _escape_cell(text: str) -> str:
    return html.escape(" ".join(text.split())).replace("|", "\\|")


def _context(cmd: Any, name: str, parent: Any = None) -> Any:
    # typer may vendor its own click: use the command's own context class.
    return cmd.context_class(cmd, info_name=name, parent=parent)


def _command_doc(cmd: Any, ctx: Any, level: int) -> list[str]:
    path = ctx.command_path
    lines = [f"{'#' * level} `{path}`", ""]
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines += ["```text", f"{path} {usage}".rstrip(), "```", ""]
    if cmd.help:
        lines += ["```text", cmd.help.replace("\b\n", "").strip(), "```", ""]
    rows = []
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        opts, help_text = record
        rows.append(f"| `{opts}` | {_escape_cell(help_text)} |")
    if rows:
        lines += ["| option | meaning |", "|---|---|", *rows, ""]
    if hasattr(cmd, "list_commands"):  # a group
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            lines += _command_doc(sub, _context(sub, name, ctx), min(level + 1, 4))
    return lines


def cli_reference() -> str:
    from ironclaw_orchestrator.cli import app

    root = typer.main.get_command(app)
    ctx = _context(root, "ironclaw")
    return "\n".join(_command_doc(root, ctx, 2))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown
