"""Freestanding C test guests, compiled at test time (nothing binary is committed).

Each ``<name>.c`` here is linked at 2 MiB by ``link.ld`` into an x86_64 ELF that Firecracker
boots as a kernel. Tests call :func:`build_guest`, which skips the test without a C compiler.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
CFLAGS = (
    "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-ffreestanding", "-fno-builtin",
    "-fno-stack-protector", "-fno-pic", "-no-pie", "-mno-red-zone", "-mno-sse", "-mno-mmx",
    "-mno-80387", "-fcf-protection=none", "-nostdlib", "-static", "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=4096", "-Wl,-z,noexecstack",
)  # fmt: skip


def build_guest(name: str, out_dir: Path) -> Path:
    """Compile ``tests/guests/<name>.c`` into ``out_dir`` (world-readable, for the jail)."""
    if platform.machine() != "x86_64":
        pytest.skip(f"the {name} test guest is x86_64 code; this host is {platform.machine()}")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip(f"no C compiler to build the {name} test guest (apt-get install gcc)")
    out = out_dir / f"{name}.elf"
    argv = [cc, *CFLAGS, f"-Wl,-T,{HERE / 'link.ld'}", "-o", str(out), str(HERE / f"{name}.c")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"compiling the {name} guest failed:\n{proc.stderr}"
    out.chmod(0o644)
    return out
