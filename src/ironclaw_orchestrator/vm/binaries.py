"""Finding the firecracker and jailer binaries and reading their versions.

Search order for each binary: the explicit config value, then ``IRONCLAW_FIRECRACKER`` /
``IRONCLAW_JAILER``, then ``firecracker`` / ``jailer`` on ``PATH``, then the spec's defaults
(``/usr/local/bin/firecracker-v1.14.1``, ``/usr/local/bin/jailer``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import total_ordering
from pathlib import Path

from ..errors import BinaryNotFoundError, ConfigError, JailerNotFoundError, VersionMismatchError
from ..names import exec_file_name
from .config import DEFAULT_EXEC_FILE, DEFAULT_JAILER_BINARY

FIRECRACKER_ENV = "IRONCLAW_FIRECRACKER"
JAILER_ENV = "IRONCLAW_JAILER"
INSTALL_HINT = (
    "install them with `ironclaw install` (or copy release-vX-<arch>/jailer and "
    "firecracker-vX-<arch> from a Firecracker release to /usr/local/bin, mode 0755), "
    f"or point {FIRECRACKER_ENV} / {JAILER_ENV} at them"
)

_VERSION_RE = re.compile(r"v(\d+)\.(\d+)\.(\d+)(\S*)")


@total_ordering
@dataclass(frozen=True)
class Version:
    """A Firecracker release version such as ``v1.14.1`` (build suffix kept, not compared)."""

    major: int
    minor: int
    patch: int
    suffix: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        m = _VERSION_RE.search(text)
        if not m:
            raise ValueError(f"no version like v1.2.3 in {text!r}")
        return cls(int(m[1]), int(m[2]), int(m[3]), m[4])

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.release < other.release

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.release == other.release

    def __hash__(self) -> int:
        return hash(self.release)

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}.{self.patch}{self.suffix}"


def _which(name: str) -> Path | None:
    found = shutil.which(name)
    return Path(found) if found else None


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_firecracker(explicit: Path | None = None) -> Path:
    """Locate the firecracker binary (see module docstring for the order)."""
    return _find("firecracker", explicit, FIRECRACKER_ENV, DEFAULT_EXEC_FILE, BinaryNotFoundError)


def find_jailer(explicit: Path | None = None) -> Path:
    """Locate the jailer binary (see module docstring for the order)."""
    return _find("jailer", explicit, JAILER_ENV, DEFAULT_JAILER_BINARY, JailerNotFoundError)


def _find(
    name: str,
    explicit: Path | None,
    env: str,
    default: Path,
    error: type[BinaryNotFoundError],
) -> Path:
    tried: list[str] = []
    if explicit is not None:
        if _executable(explicit):
            return explicit
        raise error(
            f"{name} binary not found at {explicit} (configured explicitly): "
            f"check the path and that it is executable, or {INSTALL_HINT}"
        )
    env_value = os.environ.get(env)
    if env_value:
        path = Path(env_value)
        if _executable(path):
            return path
        raise error(
            f"{name} binary not found at {path} (from ${env}): "
            f"fix or unset {env}, or {INSTALL_HINT}"
        )
    tried.append(f"${env} (unset)")
    on_path = _which(name)
    if on_path is not None:
        return on_path
    tried.append(f"{name!r} on PATH")
    if _executable(default):
        return default
    tried.append(str(default))
    raise error(f"{name} binary not found at {default} (tried {', '.join(tried)}): {INSTALL_HINT}")


_version_cache: dict[tuple[str, int, int], Version] = {}


def read_version(binary: Path) -> Version:
    """Run ``binary --version`` once per (path, size, mtime) and parse the release."""
    st = binary.stat()
    key = (str(binary.resolve()), st.st_size, st.st_mtime_ns)
    cached = _version_cache.get(key)
    if cached is not None:
        return cached
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinaryNotFoundError(
            f"could not run {binary} --version: {exc}; check it is a Firecracker release "
            "binary for this architecture"
        ) from exc
    try:
        version = Version.parse(out.stdout + out.stderr)
    except ValueError:
        raise BinaryNotFoundError(
            f"{binary} --version printed no Firecracker version ({out.stdout.strip()[:80]!r}): "
            "is it really firecracker/jailer?"
        ) from None
    _version_cache[key] = version
    return version


@dataclass(frozen=True)
class Binaries:
    """A matching jailer + firecracker pair."""

    jailer: Path
    firecracker: Path
    version: Version


def check_pair(jailer: Path, firecracker: Path) -> Binaries:
    """Read both versions and refuse a mismatch (the jailer must match its firecracker)."""
    jv = read_version(jailer)
    fv = read_version(firecracker)
    if jv.release != fv.release:
        raise VersionMismatchError(
            f"jailer {jailer} is {jv} but firecracker {firecracker} is {fv}: they must come "
            "from the same Firecracker release; install both from one release archive "
            "(`ironclaw install --version vX.Y.Z`)"
        )
    check_exec_file_name(firecracker, fv)
    return Binaries(jailer=jailer, firecracker=firecracker, version=fv)


def check_exec_file_name(exec_file: Path, version: Version) -> None:
    """Jailer v1.2 .. v1.12 refuse an exec file whose name lacks "firecracker".

    The jailer checks the name of the *resolved* file (it canonicalises ``--exec-file``), so
    a symlink named ``firecracker`` to ``vmm-v1.5.0`` is refused as well.
    """
    name = exec_file_name(exec_file)
    if (1, 2, 0) <= version.release < (1, 13, 0) and "firecracker" not in name:
        raise ConfigError(
            f"exec_file {exec_file} (resolved name {name!r}): jailer {version} requires the "
            "file name to contain 'firecracker'; rename the file itself (e.g. firecracker-"
            f"{version}): a symlink does not help, the jailer resolves it"
        )
