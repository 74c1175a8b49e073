"""How one host agent is configured (``ironclaw serve`` flags), and its bearer token.

Everything an agent decides for the VMs it starts (where jails go, which images a request
may name, whether unjailed VMs are allowed) is here, not in the request: a client of the
API chooses the VM, the operator chooses the host policy.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError
from ..registry import default_state_dir
from ..vm.config import DEFAULT_CHROOT_BASE, config_error
from ..vm.rundir import run_root

__all__ = [
    "DEFAULT_IMAGE_DIR",
    "DEFAULT_SOCKET",
    "AgentSettings",
    "read_token",
]

DEFAULT_SOCKET = Path("/run/ironclaw/agent.sock")
DEFAULT_IMAGE_DIR = Path("/var/lib/ironclaw/images")
#: A VmConfig is a few hundred bytes; 64 KiB leaves room and bounds what a client can send.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_MAX_FILE_BYTES = 512 * 2**20
MIN_TOKEN_BYTES = 16


class AgentSettings(BaseModel):
    """The host agent's configuration. Paths are absolute; labels are ``key=value`` pairs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    socket_path: Path = DEFAULT_SOCKET
    state_dir: Path = Field(default_factory=default_state_dir)
    run_dir: Path = Field(default_factory=run_root)
    chroot_base: Path = DEFAULT_CHROOT_BASE
    #: ``HOST:PORT`` to listen on TCP as well (needs ``token_file``).
    tcp: str | None = None
    token_file: Path | None = None
    #: Directories a request's ``kernel_path`` / ``rootfs_path`` must lie in (symlinks resolved).
    image_dirs: tuple[Path, ...] = (DEFAULT_IMAGE_DIR,)
    #: Refuse VMs that cannot be jailed (production). ``False`` is for development hosts.
    require_sandbox: bool = True
    labels: dict[str, str] = Field(default_factory=dict)
    #: Capacity; ``None``: this host's CPUs / memory (minus ``reserved_memory_mb``).
    capacity_vcpus: int | None = Field(default=None, ge=1)
    capacity_memory_mb: int | None = Field(default=None, ge=1)
    reserved_memory_mb: int = Field(default=1024, ge=0)
    cpu_overcommit: float = Field(default=4.0, gt=0, le=64)
    memory_overcommit: float = Field(default=1.0, gt=0, le=16)
    max_starting: int = Field(default=16, ge=1)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    #: Largest file uploaded to (or downloaded from) a guest through ``/v1/vms/{id}/files``.
    max_file_bytes: int = Field(default=DEFAULT_MAX_FILE_BYTES, ge=1)
    #: How long SIGTERM waits for starts in flight before the agent exits.
    drain_timeout_s: float = Field(default=60.0, ge=0)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, "ironclaw serve settings") from None

    @field_validator("socket_path", "state_dir", "run_dir", "chroot_base", "token_file")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return None if v is None else Path(os.path.abspath(v))

    @field_validator("image_dirs")
    @classmethod
    def _image_dirs(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(Path(os.path.realpath(p)) for p in v)

    @field_validator("tcp")
    @classmethod
    def _tcp(cls, v: str | None) -> str | None:
        if v is None:
            return None
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdecimal() or not 0 < int(port) < 65536:
            raise ValueError(f"--tcp {v!r} must be HOST:PORT, e.g. 127.0.0.1:7070")
        return v

    def tcp_address(self) -> tuple[str, int] | None:
        if self.tcp is None:
            return None
        host, _, port = self.tcp.rpartition(":")
        return host.strip("[]"), int(port)


def read_token(path: Path) -> bytes:
    """The bearer token in ``path``: one line, at least 16 bytes, file not readable by others.

    Raises ``ConfigError`` naming the file and the fix, so the agent refuses to start rather
    than listen on TCP with a weak or leaked token.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"token file {path} cannot be opened: {exc.strerror}; create it with "
            f"`head -c 32 /dev/urandom | base64 > {path} && chmod 600 {path}`"
        ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"token file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"token file {path} is readable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}): `chmod 600 {path}`"
            )
        token = f.read(4096).strip()
    if len(token) < MIN_TOKEN_BYTES or b"\n" in token:
        raise ConfigError(
            f"token file {path} must hold one line of at least {MIN_TOKEN_BYTES} characters, "
            f"e.g. `head -c 32 /dev/urandom | base64 > {path}`"
        )
    return token
