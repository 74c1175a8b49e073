"""The guest agent on the other Python 3 interpreters of this machine (guests have old ones).

The guest modules are copied out as the stand-alone package ``ironclaw_agent`` (what
``ironclaw image add-agent`` installs) and run with ``-S`` (no site-packages) under every
Python 3.7+ found on PATH or in ~/.pyenv; the host client drives them.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import short_dir

import ironclaw_orchestrator.agent as agent_pkg
from ironclaw_orchestrator.agent import AgentClient
from ironclaw_orchestrator.agent.image import GUEST_MODULES


def interpreters() -> list[str]:
    found: dict[str, str] = {}
    candidates = [shutil.which(f"python3.{minor}") for minor in range(7, 15)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    for path in filter(None, candidates):
        try:
            out = subprocess.run(
                [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        if re.fullmatch(r"3\.\d+", out) and int(out.split(".")[1]) >= 7:
            found.setdefault(out, path)
    return [found[v] for v in sorted(found, key=lambda v: int(v.split(".")[1]))]


PYTHONS = interpreters()


@pytest.fixture
def package() -> Iterator[Path]:
    with short_dir() as d:
        pkg = d / "ironclaw_agent"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        for name in GUEST_MODULES:
            shutil.copy(Path(agent_pkg.__file__).parent / name, pkg / name)
        yield d


@pytest.mark.skipif(not PYTHONS, reason="no Python 3 interpreter found")
@pytest.mark.parametrize("python", PYTHONS)
async def test_agent_runs_on(python: str, package: Path) -> None:
    sock = package / "a.sock"
    proc = subprocess.Popen(
        [python, "-S", "-m", "ironclaw_agent", "--listen", f"unix:{sock}"],
        cwd=package, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        client = await AgentClient.connect_unix(sock)
        result = await client.exec(["sh", "-c", "cat; exit 3"], stdin=b"in", timeout_s=60)
        assert (result.exit_code, result.stdout) == (3, b"in")
        assert (await client.exec(["sleep", "60"], timeout_s=0.5)).timed_out
        data = os.urandom(200_000)
        (package / "src").write_bytes(data)
        await client.put_file(package / "src", str(package / "dst"))
        await client.get_file(str(package / "dst"), package / "back")
        assert (package / "back").read_bytes() == data
        await client.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        if proc.stderr:
            proc.stderr.close()
