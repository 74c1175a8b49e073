"""What a Firecracker release is: versions, architectures, the official URL, archive layout.

Pure (no I/O): the names every other part of the installer agrees on.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InstallError

#: The Firecracker release installed when no version is given.
DEFAULT_VERSION = "v1.14.1"
#: Where binaries are installed by default.
DEFAULT_PREFIX = Path("/usr/local/bin")
#: The jailer's default chroot base directory.
DEFAULT_CHROOT_BASE_DIR = Path("/var/jail")
#: Official release archive; ``{version}`` is ``vX.Y.Z``, ``{arch}`` one of SUPPORTED_ARCHES.
RELEASE_URL_TEMPLATE = (
    "https://github.com/firecracker-microvm/firecracker/releases/download/"
    "{version}/firecracker-{version}-{arch}.tgz"
)
#: Where users can check which versions exist.
RELEASES_PAGE = "https://github.com/firecracker-microvm/firecracker/releases"
#: Suffix of the checksum file published next to every release archive.
CHECKSUM_SUFFIX = ".sha256.txt"
#: Architectures Firecracker publishes release archives for.
SUPPORTED_ARCHES = ("x86_64", "aarch64")

_VERSION_RE = re.compile(r"v?([0-9]+)\.([0-9]+)\.([0-9]+)", re.ASCII)
_ARCH_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
}


def normalize_version(version: str) -> str:
    """Return ``version`` as ``vX.Y.Z`` (``1.14.1`` -> ``v1.14.1``); raise on anything else."""
    match = _VERSION_RE.fullmatch(version.strip())
    if match is None:
        raise InstallError(
            f"invalid Firecracker version {version!r}: expected the form vX.Y.Z "
            f"(e.g. {DEFAULT_VERSION}); pass an existing release from {RELEASES_PAGE} "
            "to --version"
        )
    major, minor, patch = (str(int(part)) for part in match.groups())
    return f"v{major}.{minor}.{patch}"


def host_arch(machine: str | None = None) -> str:
    """Map ``platform.machine()`` (or ``machine``) to Firecracker's arch name."""
    raw = platform.machine() if machine is None else machine
    arch = _ARCH_ALIASES.get(raw.lower())
    if arch is None:
        raise InstallError(
            f"unsupported CPU architecture {raw!r}: Firecracker releases exist only for "
            f"{' and '.join(SUPPORTED_ARCHES)}; install on such a host (or pass arch= "
            "explicitly when preparing binaries for another host)"
        )
    return arch


def release_archive_url(version: str = DEFAULT_VERSION, arch: str | None = None) -> str:
    """The official release archive URL for ``version`` and ``arch`` (default: this host)."""
    v = normalize_version(version)
    a = host_arch() if arch is None else host_arch(arch)
    return RELEASE_URL_TEMPLATE.format(version=v, arch=a)


@dataclass(frozen=True, slots=True)
class _Plan:
    version: str
    arch: str
    prefix: Path
    chroot_base_dir: Path
    link_default: bool

    @property
    def member_dir(self) -> str:
        return f"release-{self.version}-{self.arch}"

    @property
    def firecracker_member(self) -> str:
        return f"{self.member_dir}/firecracker-{self.version}-{self.arch}"

    @property
    def jailer_member(self) -> str:
        return f"{self.member_dir}/jailer-{self.version}-{self.arch}"

    @property
    def firecracker_path(self) -> Path:
        return self.prefix / f"firecracker-{self.version}"

    @property
    def jailer_path(self) -> Path:
        return self.prefix / "jailer"

    @property
    def link_path(self) -> Path:
        return self.prefix / "firecracker"
