"""Install ``ironclaw-agent`` into an ext2/3/4 root filesystem image, with e2fsprogs' debugfs.

No loop mount (no root needed for a file you own, nothing mounted if we fail half-way): each
file is written into the image with ``debugfs -w``. What is installed:

* ``/usr/lib/ironclaw-agent/ironclaw_agent/``: the agent's modules (standard library only);
* ``/usr/local/bin/ironclaw-agent``: a launcher (``#!/usr/bin/env python3``);
* with systemd in the image: ``/etc/systemd/system/ironclaw-agent.service``, enabled for
  ``multi-user.target``. Other inits: start ``/usr/local/bin/ironclaw-agent`` yourself.

The image must not be in use by a running VM while this runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, HostError, StagingError

AGENT_DIR = "/usr/lib/ironclaw-agent"
PACKAGE_DIR = f"{AGENT_DIR}/ironclaw_agent"
LAUNCHER = "/usr/local/bin/ironclaw-agent"
UNIT = "/etc/systemd/system/ironclaw-agent.service"
WANTS_LINK = "/etc/systemd/system/multi-user.target.wants/ironclaw-agent.service"
#: The modules that make up the guest agent (the rest of the package is host-only).
GUEST_MODULES = ("protocol.py", "server.py", "commands.py", "files.py", "__main__.py")
SYSTEMD_MARKERS = ("/lib/systemd/systemd", "/usr/lib/systemd/systemd")
PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")

LAUNCHER_TEXT = f"""#!/usr/bin/env python3
# ironclaw-agent, installed by `ironclaw image add-agent` (docs/agent-protocol.md).
import sys

sys.path.insert(0, "{AGENT_DIR}")
from ironclaw_agent.server import main  # noqa: E402

sys.exit(main())
"""
UNIT_TEXT = f"""[Unit]
Description=ironclaw guest agent (commands and files over vsock)
After=local-fs.target

[Service]
ExecStart={LAUNCHER}
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""
INSTALL_HINT = "install e2fsprogs (e.g. `apt-get install e2fsprogs`)"


@dataclass(frozen=True)
class AgentInstall:
    """What :func:`add_agent` put into the image."""

    rootfs: Path
    files: tuple[str, ...]
    systemd_enabled: bool
    python_found: bool


def find_debugfs() -> str:
    found = shutil.which("debugfs") or next(
        (p for p in ("/usr/sbin/debugfs", "/sbin/debugfs") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise HostError(f"debugfs (e2fsprogs) is not installed: {INSTALL_HINT}")
    return found


class _Image:
    def __init__(self, debugfs: str, rootfs: Path) -> None:
        self.debugfs = debugfs
        self.rootfs = rootfs

    def run(self, request: str, *, write: bool = False) -> tuple[str, str]:
        """One debugfs request; its stdout and its complaints (the banner removed)."""
        argv = [self.debugfs, *(["-w"] if write else []), "-R", request, str(self.rootfs)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StagingError(f"debugfs failed on {self.rootfs}: {exc}") from exc
        errors = [ln for ln in proc.stderr.splitlines() if ln and not ln.startswith("debugfs ")]
        return proc.stdout, "\n".join(errors)

    def must(self, request: str) -> None:
        _, err = self.run(request, write=True)
        if err:
            raise StagingError(
                f"writing into {self.rootfs} failed at `{request}`: {err}. Is the image in use, "
                "read-only or full? (Grow it with e2fsck -f + resize2fs.)"
            )

    def exists(self, path: str) -> bool:
        _, err = self.run(f'stat "{path}"')
        return not err

    def mkdirs(self, path: str) -> None:
        parts = Path(path).parts[1:]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            if not self.exists(d):
                self.must(f'mkdir "{d}"')

    def put(self, local: Path, path: str, mode: int) -> None:
        if self.exists(path):
            self.must(f'rm "{path}"')
        self.must(f'write "{local}" "{path}"')
        self.must(f'sif "{path}" mode 0{0o100000 | mode:o}')
        self.must(f'sif "{path}" uid 0')
        self.must(f'sif "{path}" gid 0')


def add_agent(rootfs: Path, *, systemd: bool | None = None) -> AgentInstall:
    """Install (or update) the guest agent in the ext2/3/4 image ``rootfs``.

    ``systemd=None`` installs and enables the unit when the image has systemd.
    """
    rootfs = Path(rootfs)
    if not rootfs.is_file():
        raise ConfigError(f"ROOTFS {rootfs} is not a file: pass an ext4 root filesystem image")
    if not os.access(rootfs, os.R_OK | os.W_OK):
        raise ConfigError(f"ROOTFS {rootfs} is not readable and writable by this user")
    image = _Image(find_debugfs(), rootfs)
    _, err = image.run("stat /")
    if err:
        raise ConfigError(f"ROOTFS {rootfs} is not an ext2/3/4 image debugfs can open: {err}")
    if systemd is None:
        systemd = any(image.exists(p) for p in SYSTEMD_MARKERS)
    source = Path(__file__).parent
    files: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ironclaw-add-agent-") as tmp:
        staged = Path(tmp)
        (staged / "__init__.py").write_text('"""ironclaw-agent (guest side)."""\n')
        (staged / "launcher").write_text(LAUNCHER_TEXT)
        (staged / "unit").write_text(UNIT_TEXT)
        image.mkdirs(PACKAGE_DIR)
        for name in (*GUEST_MODULES, "__init__.py"):
            local = staged / name if name == "__init__.py" else source / name
            image.put(local, f"{PACKAGE_DIR}/{name}", 0o644)
            files.append(f"{PACKAGE_DIR}/{name}")
        image.mkdirs(str(Path(LAUNCHER).parent))
        image.put(staged / "launcher", LAUNCHER, 0o755)
        files.append(LAUNCHER)
        if systemd:
            image.mkdirs(str(Path(WANTS_LINK).parent))
            image.put(staged / "unit", UNIT, 0o644)
            if image.exists(WANTS_LINK):
                image.must(f'rm "{WANTS_LINK}"')
            image.must(f'symlink "{WANTS_LINK}" "{UNIT}"')
            files += [UNIT, WANTS_LINK]
    python = any(image.exists(p) for p in PYTHONS)
    return AgentInstall(rootfs, tuple(files), bool(systemd), python)
