"""``ironclaw serve`` flag errors: refused before anything is bound or written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ironclaw_orchestrator.cli import app


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tcp", "127.0.0.1:7070"], "--tcp needs --token-file"),
        (["--tcp", "localhost"], "must be HOST:PORT"),
        (["--label", "novalue"], "must be KEY=VALUE"),
        (["--tcp", "127.0.0.1:7070", "--token-file", "/nonexistent/token"], "cannot be opened"),
    ],
)
def test_bad_serve_flags_exit_2_with_a_clear_message(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    sock = tmp_path / "agent.sock"
    result = CliRunner().invoke(
        app, ["serve", "--socket", str(sock), "--state-dir", str(tmp_path / "s"), *args]
    )
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split())
    assert not sock.exists()
