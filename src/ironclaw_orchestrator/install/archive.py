"""Archive safety: refuse unsafe tar members, select exactly the two release binaries.

Every member is checked (absolute paths, ``..``, links leading outside the archive,
devices/FIFOs) before anything is extracted; nothing is ever ``extractall``-ed.
"""

from __future__ import annotations

import posixpath
import tarfile
from pathlib import PurePosixPath

from ..errors import InstallError
from .release import RELEASES_PAGE, _Plan

_MAX_BINARY_SIZE = 512 * 1024 * 1024


def _escapes(path: str) -> bool:
    return path.startswith("/") or path == ".." or path.startswith("../")


def _check_member(member: tarfile.TarInfo, archive: str) -> str:
    """Refuse unsafe members; return the member's normalised name."""
    name = member.name
    fix = "use the official release archive from " + RELEASES_PAGE
    if not name or name.startswith("/"):
        raise InstallError(
            f"refusing archive {archive}: member {name!r} has an absolute path; {fix}"
        )
    if ".." in PurePosixPath(name).parts:
        raise InstallError(f"refusing archive {archive}: member {name!r} contains '..'; {fix}")
    normalized = posixpath.normpath(name)
    if member.isdev():
        raise InstallError(
            f"refusing archive {archive}: member {name!r} is a device or FIFO; {fix}"
        )
    if member.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(normalized), member.linkname))
        if member.linkname.startswith("/") or _escapes(target):
            raise InstallError(
                f"refusing archive {archive}: symlink {name!r} -> {member.linkname!r} points "
                f"outside the archive; {fix}"
            )
    elif member.islnk():
        target = posixpath.normpath(member.linkname)
        if (
            member.linkname.startswith("/")
            or ".." in PurePosixPath(member.linkname).parts
            or (_escapes(target))
        ):
            raise InstallError(
                f"refusing archive {archive}: hard link {name!r} -> {member.linkname!r} "
                f"points outside the archive; {fix}"
            )
    elif not (member.isreg() or member.isdir()):
        raise InstallError(
            f"refusing archive {archive}: member {name!r} has unsupported type "
            f"{member.type!r}; {fix}"
        )
    return normalized


def _select_members(
    tf: tarfile.TarFile, plan: _Plan, archive: str
) -> tuple[tarfile.TarInfo, tarfile.TarInfo]:
    wanted = {plan.firecracker_member: "firecracker", plan.jailer_member: "jailer"}
    found: dict[str, tarfile.TarInfo] = {}
    other_releases: set[str] = set()
    for member in tf:
        name = _check_member(member, archive)
        if name in wanted:
            if name in found:
                raise InstallError(
                    f"refusing archive {archive}: it contains {name!r} more than once; "
                    f"use the official release archive from {RELEASES_PAGE}"
                )
            if not member.isreg():
                raise InstallError(
                    f"refusing archive {archive}: {name!r} is not a regular file; use the "
                    f"official release archive from {RELEASES_PAGE}"
                )
            if member.size > _MAX_BINARY_SIZE:
                raise InstallError(
                    f"refusing archive {archive}: {name!r} is {member.size} bytes, more "
                    f"than the {_MAX_BINARY_SIZE} expected at most; use the official "
                    f"release archive from {RELEASES_PAGE}"
                )
            found[name] = member
        elif posixpath.basename(posixpath.dirname(name)).startswith("release-"):
            other_releases.add(posixpath.dirname(name))
    missing = [name for name in wanted if name not in found]
    if missing:
        hint = ""
        if other_releases - {plan.member_dir}:
            hint = f" (it contains {', '.join(sorted(other_releases))})"
        raise InstallError(
            f"archive {archive} does not contain {' and '.join(missing)}{hint}; pass the "
            f"--version and arch the archive was built for (wanted {plan.version} "
            f"{plan.arch}), or use the official release archive from {RELEASES_PAGE}"
        )
    return found[plan.firecracker_member], found[plan.jailer_member]
