"""``ironclaw image add-agent``: the agent written into a real ext4 image with debugfs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import short_dir
from typer.testing import CliRunner

import ironclaw_orchestrator.agent as agent_pkg
from ironclaw_orchestrator.agent import AgentClient
from ironclaw_orchestrator.agent.image import GUEST_MODULES, LAUNCHER, UNIT, WANTS_LINK, add_agent
from ironclaw_orchestrator.cli import app
from ironclaw_orchestrator.errors import ConfigError

pytestmark = pytest.mark.skipif(
    not (shutil.which("mkfs.ext4") and shutil.which("debugfs") and shutil.which("e2fsck")),
    reason="needs e2fsprogs (mkfs.ext4, debugfs, e2fsck): apt-get install e2fsprogs",
)


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_dir() as d:
        yield d


def make_image(workdir: Path, *, systemd: bool) -> Path:
    tree = workdir / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "etc" / "hostname").write_text("guest\n")
    if systemd:
        (tree / "lib" / "systemd").mkdir(parents=True)
        (tree / "lib" / "systemd" / "systemd").write_text("")
    image = workdir / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(tree), str(image), "16M"], check=True)
    return image


def debugfs(image: Path, request: str) -> str:
    out = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return out.stdout


def fsck_clean(image: Path) -> None:
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def test_installed_agent_is_complete_and_runs(workdir: Path) -> None:
    image = make_image(workdir, systemd=True)
    done = add_agent(image)
    assert done.systemd_enabled and not done.python_found
    assert {UNIT, WANTS_LINK, LAUNCHER} <= set(done.files)
    fsck_clean(image)
    assert debugfs(image, "cat /etc/hostname") == "guest\n"  # the rest is untouched
    assert "Mode:  0755" in debugfs(image, f"stat {LAUNCHER}")
    assert f'Fast link dest: "{UNIT}"' in debugfs(image, f"stat {WANTS_LINK}")
    assert "ExecStart=/usr/local/bin/ironclaw-agent" in debugfs(image, f"cat {UNIT}")
    # Take the files back out and run exactly what was installed.
    out = workdir / "out"
    out.mkdir()
    debugfs(image, f"rdump /usr/lib/ironclaw-agent {out}")
    debugfs(image, f"dump {LAUNCHER} {out / 'launcher'}")
    source = Path(agent_pkg.__file__).parent
    for name in GUEST_MODULES:
        assert (out / "ironclaw-agent" / "ironclaw_agent" / name).read_bytes() == (
            source / name
        ).read_bytes()
    sock = workdir / "a.sock"
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c",  # no site-packages: only what was installed
         f"import sys; sys.path.insert(0, {str(out / 'ironclaw-agent')!r}); "
         f"sys.argv = ['ironclaw-agent', '--listen', 'unix:{sock}']; "
         f"exec(open({str(out / 'launcher')!r}).read())"],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        client = await AgentClient.connect_unix(sock)
        result = await client.exec(["echo", "from the image"])
        await client.close()
        assert result.stdout == b"from the image\n"
        assert (
            "ironclaw_orchestrator"
            not in subprocess.run(
                ["cat", f"/proc/{proc.pid}/maps"], capture_output=True, text=True
            ).stdout
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_reinstall_and_no_systemd(workdir: Path) -> None:
    image = make_image(workdir, systemd=False)
    first = add_agent(image)
    second = add_agent(image)
    assert first == second and not second.systemd_enabled
    assert UNIT not in second.files
    fsck_clean(image)
    assert (
        "File not found"
        in subprocess.run(
            ["debugfs", "-R", f"stat {UNIT}", str(image)], capture_output=True, text=True
        ).stderr
    )


def test_bad_images_are_refused(workdir: Path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        add_agent(workdir / "missing.ext4")
    junk = workdir / "junk.img"
    junk.write_bytes(b"\0" * 1024 * 1024)
    with pytest.raises(ConfigError, match="ext2/3/4"):
        add_agent(junk)


def test_cli_add_agent(workdir: Path) -> None:
    image = make_image(workdir, systemd=False)
    result = CliRunner().invoke(app, ["image", "add-agent", str(image)])
    assert result.exit_code == 0, result.output
    assert LAUNCHER in result.output and "no systemd" in result.output
    assert "no python3" in result.output
    result = CliRunner().invoke(app, ["image", "add-agent", str(workdir / "nope.ext4")])
    assert result.exit_code == 2 and "not a file" in result.output
