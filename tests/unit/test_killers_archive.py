"""install/archive.py member checks, member by member (no download, no extraction).

The install tests refuse whole archives end to end; these pin each rule's edge and message.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import InstallError
from ironclaw_orchestrator.install.archive import _check_member, _select_members
from ironclaw_orchestrator.install.release import RELEASES_PAGE, _Plan

PLAN = _Plan("v1.14.1", "x86_64", Path("/usr/local/bin"), Path("/srv/jail"), True)
DIR = "release-v1.14.1-x86_64"
FC = f"{DIR}/firecracker-v1.14.1-x86_64"
JL = f"{DIR}/jailer-v1.14.1-x86_64"
FIX = f"use the official release archive from {RELEASES_PAGE}"


def member(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", size: int = 10
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = size
    return info


def refused(info: tarfile.TarInfo) -> str:
    with pytest.raises(InstallError) as exc:
        _check_member(info, "fc.tgz")
    return str(exc.value)


def select(*members: tarfile.TarInfo) -> tuple[tarfile.TarInfo, tarfile.TarInfo]:
    return _select_members(list(members), PLAN, "fc.tgz")  # type: ignore[arg-type]


def test_names_are_normalised() -> None:
    assert _check_member(member(f"./{DIR}//LICENSE"), "a") == f"{DIR}/LICENSE"
    assert _check_member(member(f"{DIR}/", tarfile.DIRTYPE), "a") == DIR
    assert _check_member(member("..x"), "a") == "..x"  # a file named "..x" stays inside


def test_absolute_and_dotdot_messages() -> None:
    assert refused(member("/etc/passwd")) == (
        f"refusing archive fc.tgz: member '/etc/passwd' has an absolute path; {FIX}"
    )
    assert refused(member("")) == f"refusing archive fc.tgz: member '' has an absolute path; {FIX}"
    assert refused(member("a/../../b")) == (
        f"refusing archive fc.tgz: member 'a/../../b' contains '..'; {FIX}"
    )


def test_device_message() -> None:
    assert refused(member("dev/null", tarfile.CHRTYPE)) == (
        f"refusing archive fc.tgz: member 'dev/null' is a device or FIFO; {FIX}"
    )


@pytest.mark.parametrize(
    ("name", "target", "inside"),
    [
        ("d/up", "../LICENSE", True),
        ("d/e/up", "../../LICENSE", True),
        ("top", "..x", True),
        ("d/up", "../../etc", False),
        ("top", "..", False),
        ("top", "../x", False),
        ("d/abs", "/etc/passwd", False),
    ],
)
def test_symlink_targets(name: str, target: str, inside: bool) -> None:
    info = member(name, tarfile.SYMTYPE, target)
    if inside:
        assert _check_member(info, "fc.tgz") == name
    else:
        assert refused(info) == (
            f"refusing archive fc.tgz: symlink {name!r} -> {target!r} points outside the "
            f"archive; {FIX}"
        )


@pytest.mark.parametrize(
    ("target", "inside"),
    [
        (f"{DIR}/LICENSE", True),
        ("..x", True),
        ("a/../b", False),  # stays inside once normalised, but hard links get no '..' at all
        ("..", False),
        ("/etc/passwd", False),
    ],
)
def test_hardlink_targets(target: str, inside: bool) -> None:
    info = member("h", tarfile.LNKTYPE, target)
    if inside:
        assert _check_member(info, "fc.tgz") == "h"
    else:
        assert refused(info) == (
            f"refusing archive fc.tgz: hard link 'h' -> {target!r} points outside the archive; "
            f"{FIX}"
        )


def test_unknown_member_type_message() -> None:
    assert refused(member("odd", b"Z")) == (
        f"refusing archive fc.tgz: member 'odd' has unsupported type b'Z'; {FIX}"
    )


def test_select_returns_the_two_binaries_in_order() -> None:
    fc, jl = member(FC), member(JL)
    assert select(member(DIR, tarfile.DIRTYPE), jl, member(f"{DIR}/LICENSE"), fc) == (fc, jl)
    assert select(member(f"./{JL}"), member(f"./{FC}"))[0].name == f"./{FC}"


def test_binary_size_limit_is_inclusive() -> None:
    limit = 512 * 1024 * 1024
    assert select(member(FC, size=limit), member(JL))[0].size == limit
    with pytest.raises(InstallError) as exc:
        select(member(FC), member(JL, size=limit + 1))
    assert str(exc.value) == (
        f"refusing archive fc.tgz: {JL!r} is {limit + 1} bytes, more than the {limit} "
        f"expected at most; {FIX}"
    )


def test_duplicate_and_non_regular_messages() -> None:
    with pytest.raises(InstallError) as exc:
        select(member(FC), member(JL), member(FC))
    assert str(exc.value) == f"refusing archive fc.tgz: it contains {FC!r} more than once; {FIX}"
    with pytest.raises(InstallError) as exc:
        select(member(FC, tarfile.SYMTYPE, "jailer-v1.14.1-x86_64"), member(JL))
    assert str(exc.value) == f"refusing archive fc.tgz: {FC!r} is not a regular file; {FIX}"


def test_missing_members_message() -> None:
    with pytest.raises(InstallError) as exc:
        select(member(f"{DIR}/LICENSE"))
    assert str(exc.value) == (
        f"archive fc.tgz does not contain {FC} and {JL}; pass the --version and arch the "
        f"archive was built for (wanted v1.14.1 x86_64), or {FIX}"
    )
    with pytest.raises(InstallError) as exc:
        select(member(FC))
    assert f"does not contain {JL}; pass" in str(exc.value)


def test_missing_members_name_the_releases_the_archive_holds() -> None:
    other = "release-v1.13.0-x86_64"
    with pytest.raises(InstallError) as exc:
        select(
            member(f"{other}/firecracker-v1.13.0-x86_64"),
            member(f"{other}/jailer-v1.13.0-x86_64"),
            member("x/release-v1.12.0-aarch64/jailer"),
            member("release-notes"),  # top-level file: its directory is not a release
        )
    text = str(exc.value)
    assert "(it contains release-v1.13.0-x86_64, x/release-v1.12.0-aarch64); pass" in text


def test_an_unsafe_member_while_selecting_names_the_archive() -> None:
    with pytest.raises(InstallError, match=r"^refusing archive fc\.tgz: member '/x' has an abs"):
        select(member(FC), member("/x"), member(JL))
