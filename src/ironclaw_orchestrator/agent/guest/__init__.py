"""The vsock test guest: a freestanding C program that speaks the agent protocol over vsock.

``vsock_guest.c`` is a tiny x86_64 kernel for Firecracker with a polling virtio-mmio vsock
driver; it answers the ``hello`` handshake, ``ping`` and ``echo`` (docs/agent-protocol.md) on
guest port :data:`~ironclaw_orchestrator.agent.protocol.DEFAULT_VSOCK_PORT`. It lets tests
carry real bytes through a real, jailed Firecracker where no Linux guest can boot.

No binary is shipped: :func:`build_vsock_guest` compiles the source with the system C
compiler into a cache directory, named by a digest of the source, the linker script and the
flags, so a changed source is rebuilt and an unchanged one is compiled once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import HostError, StagingError

GUEST_DIR = Path(__file__).parent
SOURCE = GUEST_DIR / "vsock_guest.c"
LINKER_SCRIPT = GUEST_DIR / "link.ld"
#: Same variable as the probe kernel's cache; guests go in its ``guests/`` subdirectory.
CACHE_DIR_ENV = "IRONCLAW_CACHE_DIR"
READY_PREFIX = "IRONCLAW-VSOCK-GUEST READY"
CFLAGS = (
    "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-ffreestanding", "-fno-builtin",
    "-fno-stack-protector", "-fno-pic", "-no-pie", "-mno-red-zone", "-mno-sse", "-mno-mmx",
    "-mno-80387", "-fcf-protection=none", "-nostdlib", "-static",
    "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096", "-Wl,-z,noexecstack",
)  # fmt: skip


def find_compiler() -> str | None:
    """``$CC`` or gcc (the flags are gcc's; clang understands them too)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env) / "guests"
    system = Path("/var/cache/ironclaw/guests")
    with contextlib.suppress(OSError):
        system.mkdir(parents=True, exist_ok=True)
        if os.access(system, os.W_OK):
            return system
    return Path.home() / ".cache" / "ironclaw" / "guests"


def build_vsock_guest(cache_dir: Path | None = None) -> Path:
    """Path of the compiled vsock test guest, compiling it first if needed.

    Raises ``HostError`` when there is no C compiler or the host is not x86_64, and
    ``StagingError`` when compiling or writing the cache fails.
    """
    if platform.machine() != "x86_64":
        raise HostError(f"the vsock test guest is x86_64 code; this host is {platform.machine()}")
    cc = find_compiler()
    if cc is None:
        raise HostError("no C compiler to build the vsock test guest: apt-get install gcc")
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), LINKER_SCRIPT.read_bytes(), " ".join(CFLAGS).encode()):
        key.update(part)
    directory = _cache_dir(cache_dir)
    target = directory / f"vsock-guest-{key.hexdigest()[:16]}.elf"
    if target.is_file():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".vsock-guest-", dir=directory)
        os.close(fd)
    except OSError as exc:
        raise StagingError(f"cannot write the vsock test guest into {directory}: {exc}") from exc
    try:
        argv = [cc, *CFLAGS, f"-Wl,-T,{LINKER_SCRIPT}", "-o", tmp, str(SOURCE)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise StagingError(
                f"compiling {SOURCE} with {cc} failed (exit {proc.returncode}):\n"
                f"{proc.stderr.strip()[-2000:]}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


__all__ = ["READY_PREFIX", "build_vsock_guest", "find_compiler"]
