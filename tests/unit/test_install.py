"""Tests for ironclaw_orchestrator.install, against fake archives served from 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import os
import platform
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fake_elf
import httpx
import pytest

from ironclaw_orchestrator import install as inst
from ironclaw_orchestrator.errors import InstallError, IronclawError
from ironclaw_orchestrator.install import (
    InstallResult,
    host_arch,
    install_firecracker,
    normalize_version,
    parse_sha256_file,
    release_archive_url,
    transaction,
    verify,
)

VERSION = "v1.14.1"
ARCH = "x86_64"
RELEASE_DIR = f"release-{VERSION}-{ARCH}"
ARCHIVE_NAME = f"firecracker-{VERSION}-{ARCH}.tgz"
FC_MEMBER = f"{RELEASE_DIR}/firecracker-{VERSION}-{ARCH}"
JAILER_MEMBER = f"{RELEASE_DIR}/jailer-{VERSION}-{ARCH}"


def script(name: str) -> bytes:
    """A shell script for the archive's other files (never run or installed)."""
    return f"#!/bin/sh\necho '{name} {VERSION}'\n".encode()


def fake_binary(program: str, padding: int = 0) -> bytes:
    """A tiny ELF executable whose ``--version`` prints what the release's does."""
    # incompressible padding, so the archive is big enough to arrive in several chunks
    return fake_elf.release_binary(program, VERSION, padding=os.urandom(padding))


FC_BYTES = fake_binary("firecracker")
JAILER_BYTES = fake_binary("jailer")


# --------------------------------------------------------------------------- archive builder

Entry = Callable[[tarfile.TarFile], None]


def reg(name: str, data: bytes, mode: int = 0o755) -> Entry:
    def add(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        tf.addfile(info, io.BytesIO(data))

    return add


def special(name: str, kind: bytes, linkname: str = "") -> Entry:
    def add(tf: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = linkname
        info.mode = 0o644
        tf.addfile(info)

    return add


def standard_entries(padding: int = 0) -> list[Entry]:
    fc = fake_binary("firecracker", padding) if padding else FC_BYTES
    return [
        special(RELEASE_DIR, tarfile.DIRTYPE),
        reg(f"{RELEASE_DIR}/LICENSE", b"Apache-2.0\n", 0o644),
        reg(f"{RELEASE_DIR}/SHA256SUMS", b"not checked\n", 0o644),
        reg(FC_MEMBER, fc),
        reg(JAILER_MEMBER, JAILER_BYTES),
        reg(f"{RELEASE_DIR}/seccompiler-bin-{VERSION}-{ARCH}", script("seccompiler")),
        reg(f"{RELEASE_DIR}/rebase-snap-{VERSION}-{ARCH}", script("rebase-snap")),
        special(f"{RELEASE_DIR}/firecracker", tarfile.SYMTYPE, f"firecracker-{VERSION}-{ARCH}"),
    ]


def make_archive(path: Path, entries: list[Entry] | None = None, *, checksum: bool = True) -> str:
    """Write a .tgz (and, if ``checksum``, its .sha256.txt); return the archive's SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for add in standard_entries() if entries is None else entries:
            add(tf)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if checksum:
        Path(f"{path}.sha256.txt").write_text(f"{digest}  {path.name}\n")
    return digest


# --------------------------------------------------------------------------- local server


class Handler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/redirect"))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server:
    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(Handler, directory=str(root))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "www")
    srv.root.mkdir()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(5)


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    return {
        "prefix": tmp_path / "bin",
        "chroot": tmp_path / "jail",
        "tmp": tmp_path / "work",
    }


@pytest.fixture(autouse=True)
def _fake_release_url(monkeypatch: pytest.MonkeyPatch, server: Server) -> None:
    """The 'official' URL points at the local server: no network beyond 127.0.0.1."""
    monkeypatch.setattr(
        inst,
        "RELEASE_URL_TEMPLATE",
        server.url + "/releases/download/{version}/firecracker-{version}-{arch}.tgz",
    )


def official_path(server: Server, version: str = VERSION) -> Path:
    return server.root / "releases" / "download" / version / f"firecracker-{version}-{ARCH}.tgz"


async def run(dirs: dict[str, Path], **kwargs: Any) -> InstallResult:
    dirs["tmp"].mkdir(exist_ok=True)
    kwargs.setdefault("arch", ARCH)
    kwargs.setdefault("chroot_base_dir", dirs["chroot"])
    kwargs.setdefault("tmp_dir", dirs["tmp"])
    version = kwargs.pop("version", VERSION)
    return await install_firecracker(version, dirs["prefix"], **kwargs)


def assert_nothing_installed(dirs: dict[str, Path]) -> None:
    prefix = dirs["prefix"]
    assert not prefix.exists() or sorted(p.name for p in prefix.iterdir()) == []
    assert not dirs["chroot"].exists()
    assert not dirs["tmp"].exists() or list(dirs["tmp"].iterdir()) == []


def assert_installed(result: InstallResult, dirs: dict[str, Path]) -> None:
    prefix = dirs["prefix"]
    fc = prefix / f"firecracker-{VERSION}"
    jailer = prefix / "jailer"
    assert result.firecracker == fc
    assert result.jailer == jailer
    assert fc.read_bytes().startswith(FC_BYTES)
    assert jailer.read_bytes() == JAILER_BYTES
    for path in (fc, jailer):
        st = path.lstat()
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o755
    # only the expected names, no temporary leftovers
    names = sorted(p.name for p in prefix.iterdir())
    expected = sorted(
        ["jailer", f"firecracker-{VERSION}"] + (["firecracker"] * bool(result.default_link))
    )
    assert names == expected
    assert list(dirs["tmp"].iterdir()) == []


# --------------------------------------------------------------------------- happy paths


async def test_happy_path_official_url(server: Server, dirs: dict[str, Path]) -> None:
    digest = make_archive(official_path(server))

    result = await run(dirs)

    assert_installed(result, dirs)
    link = dirs["prefix"] / "firecracker"
    assert result.default_link == link
    assert link.is_symlink() and os.readlink(link) == f"firecracker-{VERSION}"
    assert link.read_bytes() == FC_BYTES
    assert result.installed_paths == (result.firecracker, result.jailer, link)
    assert result.version == VERSION and result.arch == ARCH
    assert result.sha256 == digest
    assert result.source == f"{server.url}/releases/download/{VERSION}/{ARCHIVE_NAME}"
    assert result.sha256_source == result.source + ".sha256.txt"
    chroot = dirs["chroot"]
    assert result.chroot_base_dir == chroot and result.chroot_base_created
    assert chroot.is_dir() and stat.S_IMODE(chroot.stat().st_mode) == 0o755
    if os.geteuid() == 0:
        assert (chroot.stat().st_uid, chroot.stat().st_gid) == (0, 0)
    assert stat.S_IMODE(dirs["prefix"].stat().st_mode) == 0o755
    assert result.notes == ()


async def test_version_without_v_is_normalised(server: Server, dirs: dict[str, Path]) -> None:
    make_archive(official_path(server))
    result = await run(dirs, version="1.14.1")
    assert result.version == VERSION
    assert_installed(result, dirs)


async def test_redirects_are_followed(server: Server, dirs: dict[str, Path]) -> None:
    make_archive(server.root / ARCHIVE_NAME)
    result = await run(dirs, source=f"{server.url}/redirect/{ARCHIVE_NAME}")
    assert_installed(result, dirs)


async def test_existing_chroot_base_and_prefix_are_kept(
    server: Server, dirs: dict[str, Path]
) -> None:
    make_archive(official_path(server))
    dirs["chroot"].mkdir(mode=0o711)
    os.chmod(dirs["chroot"], 0o711)
    (dirs["chroot"] / "firecracker").mkdir()
    dirs["prefix"].mkdir()
    (dirs["prefix"] / "other-tool").write_text("keep me")

    result = await run(dirs)

    assert not result.chroot_base_created
    assert stat.S_IMODE(dirs["chroot"].stat().st_mode) == 0o711
    assert (dirs["chroot"] / "firecracker").is_dir()
    assert (dirs["prefix"] / "other-tool").read_text() == "keep me"


async def test_link_default_false(server: Server, dirs: dict[str, Path]) -> None:
    make_archive(official_path(server))
    result = await run(dirs, link_default=False)
    assert result.default_link is None
    assert not os.path.lexists(dirs["prefix"] / "firecracker")
    assert result.installed_paths == (result.firecracker, result.jailer)
    assert_installed(result, dirs)


async def test_regular_firecracker_file_is_not_clobbered(
    server: Server, dirs: dict[str, Path]
) -> None:
    make_archive(official_path(server))
    dirs["prefix"].mkdir()
    existing = dirs["prefix"] / "firecracker"
    existing.write_bytes(b"old firecracker")

    result = await run(dirs)

    assert existing.read_bytes() == b"old firecracker" and not existing.is_symlink()
    assert result.default_link is None
    assert any(str(existing) in note and "not a symlink" in note for note in result.notes)
    assert (dirs["prefix"] / f"firecracker-{VERSION}").read_bytes() == FC_BYTES


async def test_existing_symlink_and_jailer_are_replaced(
    server: Server, dirs: dict[str, Path]
) -> None:
    make_archive(official_path(server))
    prefix = dirs["prefix"]
    prefix.mkdir()
    (prefix / "firecracker-v1.13.0").write_bytes(b"old")
    (prefix / "firecracker").symlink_to("firecracker-v1.13.0")
    (prefix / "jailer").write_bytes(b"old jailer")

    result = await run(dirs)

    assert os.readlink(prefix / "firecracker") == f"firecracker-{VERSION}"
    assert (prefix / "jailer").read_bytes() == JAILER_BYTES
    assert (prefix / "firecracker-v1.13.0").read_bytes() == b"old"
    assert any("repointed" in n and "firecracker-v1.13.0" in n for n in result.notes)
    assert any("replaced existing" in n and "jailer" in n for n in result.notes)
    assert sorted(p.name for p in prefix.iterdir()) == sorted(
        ["firecracker", "firecracker-v1.13.0", f"firecracker-{VERSION}", "jailer"]
    )


async def test_caller_supplied_client(server: Server, dirs: dict[str, Path]) -> None:
    make_archive(official_path(server))
    async with httpx.AsyncClient(timeout=5) as client:
        result = await run(dirs, client=client)
        assert not client.is_closed  # not ours to close
    assert_installed(result, dirs)


async def test_progress_reports_increasing_byte_counts(
    server: Server, dirs: dict[str, Path]
) -> None:
    path = official_path(server)
    make_archive(path, standard_entries(padding=400_000))
    size = path.stat().st_size
    calls: list[tuple[int, int | None]] = []

    await run(dirs, progress=lambda done, total: calls.append((done, total)))

    done_values = [done for done, _ in calls]
    assert len(calls) >= 3
    assert done_values == sorted(done_values) and len(set(done_values)) == len(done_values)
    assert done_values[-1] == size
    assert {total for _, total in calls} == {size}


async def test_progress_for_local_source(tmp_path: Path, dirs: dict[str, Path]) -> None:
    archive = tmp_path / "mirror" / ARCHIVE_NAME
    make_archive(archive, standard_entries(padding=300_000))
    calls: list[tuple[int, int | None]] = []

    await run(dirs, source=str(archive), progress=lambda d, t: calls.append((d, t)))

    assert [d for d, _ in calls] == sorted({d for d, _ in calls})
    assert calls[-1] == (archive.stat().st_size, archive.stat().st_size)


# --------------------------------------------------------------------------- --from / --sha256


async def test_from_local_path_with_sibling_checksum(tmp_path: Path, dirs: dict[str, Path]) -> None:
    archive = tmp_path / "mirror" / ARCHIVE_NAME
    digest = make_archive(archive)

    result = await run(dirs, source=str(archive))

    assert_installed(result, dirs)
    assert result.source == str(archive)
    assert result.sha256 == digest
    assert result.sha256_source == f"{archive}.sha256.txt"


async def test_from_file_url(tmp_path: Path, dirs: dict[str, Path]) -> None:
    archive = tmp_path / "mirror" / ARCHIVE_NAME
    make_archive(archive)
    result = await run(dirs, source=archive.as_uri())
    assert_installed(result, dirs)
    assert result.source == str(archive)


async def test_from_http_mirror_with_checksum(server: Server, dirs: dict[str, Path]) -> None:
    make_archive(server.root / "mirror" / "fc.tgz")  # renamed: single-entry checksum file
    result = await run(dirs, source=f"{server.url}/mirror/fc.tgz")
    assert_installed(result, dirs)


async def test_from_local_path_without_checksum_is_refused(
    tmp_path: Path, dirs: dict[str, Path]
) -> None:
    archive = tmp_path / "mirror" / ARCHIVE_NAME
    make_archive(archive, checksum=False)

    with pytest.raises(InstallError) as excinfo:
        await run(dirs, source=str(archive))

    message = str(excinfo.value)
    assert str(archive) in message and "--sha256" in message and ".sha256.txt" in message
    assert_nothing_installed(dirs)


async def test_from_url_without_checksum_is_refused(server: Server, dirs: dict[str, Path]) -> None:
    make_archive(server.root / ARCHIVE_NAME, checksum=False)
    with pytest.raises(InstallError, match="--sha256"):
        await run(dirs, source=f"{server.url}/{ARCHIVE_NAME}")
    assert_nothing_installed(dirs)


async def test_official_without_checksum_file_is_refused(
    server: Server, dirs: dict[str, Path]
) -> None:
    make_archive(official_path(server), checksum=False)
    with pytest.raises(InstallError, match="refusing to install an unverified archive"):
        await run(dirs)
    assert_nothing_installed(dirs)


async def test_explicit_sha256(tmp_path: Path, dirs: dict[str, Path]) -> None:
    archive = tmp_path / "mirror" / ARCHIVE_NAME
    digest = make_archive(archive, checksum=False)

    result = await run(dirs, source=str(archive), sha256=f"sha256:{digest.upper()}")

    assert_installed(result, dirs)
    assert result.sha256 == digest and result.sha256_source == "--sha256"


async def test_explicit_sha256_overrides_checksum_file(
    tmp_path: Path, dirs: dict[str, Path]
) -> None:
    archive = tmp_path / "mirror" / ARCHIVE_NAME
    digest = make_archive(archive)
    Path(f"{archive}.sha256.txt").write_text("0" * 64 + f"  {ARCHIVE_NAME}\n")
    result = await run(dirs, source=str(archive), sha256=digest)
    assert result.sha256 == digest


async def test_explicit_wrong_sha256(tmp_path: Path, dirs: dict[str, Path]) -> None:
    archive = tmp_path / "mirror" / ARCHIVE_NAME
    digest = make_archive(archive)
    wrong = "ab" * 32
    with pytest.raises(InstallError) as excinfo:
        await run(dirs, source=str(archive), sha256=wrong)
    message = str(excinfo.value)
    assert wrong in message and digest in message and "--sha256" in message
    assert_nothing_installed(dirs)


@pytest.mark.parametrize("bad", ["abc", "g" * 64, "a" * 63, "md5:" + "a" * 64])
async def test_malformed_sha256_rejected(tmp_path: Path, dirs: dict[str, Path], bad: str) -> None:
    archive = tmp_path / "mirror" / ARCHIVE_NAME
    make_archive(archive)
    with pytest.raises(InstallError, match="64 hexadecimal"):
        await run(dirs, source=str(archive), sha256=bad)
    assert_nothing_installed(dirs)


async def test_missing_local_archive(tmp_path: Path, dirs: dict[str, Path]) -> None:
    missing = tmp_path / "nowhere.tgz"
    with pytest.raises(InstallError, match="does not exist") as excinfo:
        await run(dirs, source=str(missing), sha256="a" * 64)
    assert str(missing) in str(excinfo.value)
    assert_nothing_installed(dirs)


@pytest.mark.parametrize("source", ["ftp://example.invalid/x.tgz", "file://otherhost/x.tgz", " "])
async def test_unsupported_source(dirs: dict[str, Path], source: str) -> None:
    with pytest.raises(InstallError, match="--from"):
        await run(dirs, source=source, sha256="a" * 64)
    assert_nothing_installed(dirs)


# --------------------------------------------------------------------------- failures


async def test_checksum_mismatch_installs_nothing(server: Server, dirs: dict[str, Path]) -> None:
    path = official_path(server)
    actual = make_archive(path)
    wrong = "0" * 64
    Path(f"{path}.sha256.txt").write_text(f"{wrong}  {ARCHIVE_NAME}\n")

    with pytest.raises(InstallError) as excinfo:
        await run(dirs)

    message = str(excinfo.value)
    assert "checksum mismatch" in message
    assert wrong in message and actual in message
    assert f"/{ARCHIVE_NAME}" in message
    assert_nothing_installed(dirs)
    assert not dirs["prefix"].exists()


async def test_checksum_mismatch_leaves_existing_prefix_untouched(
    server: Server, dirs: dict[str, Path]
) -> None:
    path = official_path(server)
    make_archive(path)
    Path(f"{path}.sha256.txt").write_text("f" * 64 + "\n")
    dirs["prefix"].mkdir()
    (dirs["prefix"] / "jailer").write_bytes(b"old jailer")

    with pytest.raises(InstallError, match="checksum mismatch"):
        await run(dirs)

    assert [p.name for p in dirs["prefix"].iterdir()] == ["jailer"]
    assert (dirs["prefix"] / "jailer").read_bytes() == b"old jailer"


async def test_http_404_has_clear_message(server: Server, dirs: dict[str, Path]) -> None:
    with pytest.raises(InstallError) as excinfo:
        await run(dirs, version="v9.9.9", sha256="a" * 64)
    message = str(excinfo.value)
    assert "404" in message
    assert "/v9.9.9/firecracker-v9.9.9-x86_64.tgz" in message
    assert "--version v9.9.9" in message and "--from" in message
    assert_nothing_installed(dirs)


async def test_http_404_on_checksum_file_is_refusal(server: Server, dirs: dict[str, Path]) -> None:
    with pytest.raises(InstallError, match="--sha256") as excinfo:
        await run(dirs, version="v9.9.9")
    assert ".sha256.txt" in str(excinfo.value)
    assert_nothing_installed(dirs)


async def test_connection_refused(tmp_path: Path, dirs: dict[str, Path]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{ARCHIVE_NAME}"
    with pytest.raises(InstallError, match="could not download") as excinfo:
        await run(dirs, source=url, sha256="a" * 64)
    assert url in str(excinfo.value) and "--from" in str(excinfo.value)
    assert_nothing_installed(dirs)


def _unsafe_cases() -> list[tuple[str, list[Entry], str]]:
    base = standard_entries()
    return [
        ("dotdot", [*base, reg("../evil", b"x")], "'..'"),
        ("dotdot-inside", [*base, reg(f"{RELEASE_DIR}/../../evil", b"x")], "'..'"),
        ("absolute", [*base, reg("/etc/evil", b"x")], "absolute"),
        (
            "symlink-escape",
            [*base, special(f"{RELEASE_DIR}/evil", tarfile.SYMTYPE, "../../etc/passwd")],
            "outside",
        ),
        (
            "symlink-absolute",
            [*base, special(f"{RELEASE_DIR}/evil", tarfile.SYMTYPE, "/etc/passwd")],
            "outside",
        ),
        ("hardlink-escape", [*base, special("evil", tarfile.LNKTYPE, "../etc/passwd")], "outside"),
        ("hardlink-absolute", [*base, special("evil", tarfile.LNKTYPE, "/etc/passwd")], "outside"),
        ("chardev", [*base, special(f"{RELEASE_DIR}/null", tarfile.CHRTYPE)], "device"),
        ("blockdev", [*base, special(f"{RELEASE_DIR}/sda", tarfile.BLKTYPE)], "device"),
        ("fifo", [*base, special(f"{RELEASE_DIR}/pipe", tarfile.FIFOTYPE)], "device or FIFO"),
        (
            "binary-is-symlink",
            [
                special(FC_MEMBER, tarfile.SYMTYPE, "jailer-v1.14.1-x86_64"),
                reg(JAILER_MEMBER, JAILER_BYTES),
            ],
            "not a regular file",
        ),
        (
            "binary-is-hardlink",
            [reg(JAILER_MEMBER, JAILER_BYTES), special(FC_MEMBER, tarfile.LNKTYPE, JAILER_MEMBER)],
            "not a regular file",
        ),
        ("duplicate", [*base, reg(FC_MEMBER, b"#!/bin/sh\necho evil\n")], "more than once"),
    ]


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [pytest.param(e, f, id=i) for i, e, f in _unsafe_cases()],
)
async def test_unsafe_archive_refused(
    server: Server, dirs: dict[str, Path], entries: list[Entry], fragment: str
) -> None:
    make_archive(official_path(server), entries)
    with pytest.raises(InstallError, match="refusing archive") as excinfo:
        await run(dirs)
    assert fragment in str(excinfo.value)
    assert_nothing_installed(dirs)
    assert not dirs["prefix"].exists()


async def test_inside_symlinks_are_allowed(server: Server, dirs: dict[str, Path]) -> None:
    entries = [
        *standard_entries(),
        special(f"{RELEASE_DIR}/sub/up", tarfile.SYMTYPE, "../LICENSE"),
        special(f"{RELEASE_DIR}/hl", tarfile.LNKTYPE, f"{RELEASE_DIR}/LICENSE"),
    ]
    make_archive(official_path(server), entries)
    result = await run(dirs)
    assert_installed(result, dirs)


@pytest.mark.parametrize("missing", [FC_MEMBER, JAILER_MEMBER])
async def test_missing_member(server: Server, dirs: dict[str, Path], missing: str) -> None:
    entries = [reg(name, b"#!/bin/sh\n") for name in (FC_MEMBER, JAILER_MEMBER) if name != missing]
    make_archive(official_path(server), entries)
    with pytest.raises(InstallError, match="does not contain") as excinfo:
        await run(dirs)
    assert missing in str(excinfo.value) and "--version" in str(excinfo.value)
    assert_nothing_installed(dirs)


async def test_wrong_version_archive_names_what_it_contains(
    tmp_path: Path, dirs: dict[str, Path]
) -> None:
    archive = tmp_path / "mirror" / "fc.tgz"
    other = "release-v1.13.0-x86_64"
    make_archive(
        archive,
        [
            reg(f"{other}/firecracker-v1.13.0-x86_64", b"#!/bin/sh\n"),
            reg(f"{other}/jailer-v1.13.0-x86_64", b"#!/bin/sh\n"),
        ],
    )
    with pytest.raises(InstallError, match=other):
        await run(dirs, source=str(archive))
    assert_nothing_installed(dirs)


async def test_not_a_tar_archive(tmp_path: Path, dirs: dict[str, Path]) -> None:
    archive = tmp_path / "mirror" / ARCHIVE_NAME
    archive.parent.mkdir()
    archive.write_bytes(b"<html>not found</html>")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(InstallError, match="not a readable tar archive"):
        await run(dirs, source=str(archive), sha256=digest)
    assert_nothing_installed(dirs)


async def test_failure_during_commit_rolls_back(
    server: Server, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_archive(official_path(server))
    prefix = dirs["prefix"]
    prefix.mkdir()
    (prefix / "jailer").write_bytes(b"old jailer")
    real_replace = os.replace
    calls = 0

    def flaky_replace(src: Any, dst: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # firecracker-v…, jailer, then the symlink fails
            raise PermissionError(13, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(InstallError, match="could not install into") as excinfo:
        await run(dirs)
    monkeypatch.undo()

    assert "Permission denied" in str(excinfo.value)
    assert [p.name for p in prefix.iterdir()] == ["jailer"]
    assert (prefix / "jailer").read_bytes() == b"old jailer"
    assert not dirs["chroot"].exists()


async def test_prefix_not_a_directory(server: Server, dirs: dict[str, Path]) -> None:
    dirs["prefix"].write_text("oops")
    with pytest.raises(InstallError, match="not a directory") as excinfo:
        await run(dirs, sha256="a" * 64)
    assert str(dirs["prefix"]) in str(excinfo.value) and "--prefix" in str(excinfo.value)


async def test_chroot_base_not_a_directory(server: Server, dirs: dict[str, Path]) -> None:
    make_archive(official_path(server))
    dirs["chroot"].write_text("oops")
    with pytest.raises(InstallError, match="--chroot-base-dir"):
        await run(dirs)
    assert not dirs["prefix"].exists()


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("v1.14.1", "v1.14.1"),
        ("1.14.1", "v1.14.1"),
        (" 1.14.1\n", "v1.14.1"),
        ("v1.2.03", "v1.2.3"),
    ],
)
def test_normalize_version(given: str, expected: str) -> None:
    assert normalize_version(given) == expected


@pytest.mark.parametrize(
    "bad",
    ["", "latest", "1.14", "v1.14.1-rc1", "vv1.14.1", "1.14.1; rm -rf /", "1.١٤.1", "V1.14.1"],
)
def test_invalid_version_rejected(bad: str) -> None:
    with pytest.raises(InstallError, match=r"vX\.Y\.Z"):
        normalize_version(bad)


async def test_invalid_version_rejected_before_anything(dirs: dict[str, Path]) -> None:
    with pytest.raises(InstallError, match=r"vX\.Y\.Z"):
        await run(dirs, version="../../etc")
    assert_nothing_installed(dirs)


def test_install_error_is_ironclaw_error() -> None:
    assert issubclass(InstallError, IronclawError)


@pytest.mark.parametrize(
    ("machine", "arch"),
    [("x86_64", "x86_64"), ("AMD64", "x86_64"), ("aarch64", "aarch64"), ("arm64", "aarch64")],
)
def test_host_arch(machine: str, arch: str) -> None:
    assert host_arch(machine) == arch


def test_host_arch_unsupported() -> None:
    with pytest.raises(InstallError, match="riscv64"):
        host_arch("riscv64")


def test_host_arch_default_uses_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert host_arch() == "aarch64"


def test_release_archive_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real template, not the local-server one
    assert release_archive_url("1.14.1", "x86_64") == (
        "https://github.com/firecracker-microvm/firecracker/releases/download/"
        "v1.14.1/firecracker-v1.14.1-x86_64.tgz"
    )
    assert release_archive_url(arch="aarch64").endswith("/v1.14.1/firecracker-v1.14.1-aarch64.tgz")


def test_parse_sha256_file_variants() -> None:
    d1, d2 = "a" * 64, "b" * 64
    name = ARCHIVE_NAME
    assert parse_sha256_file(f"{d1}  {name}\n", name, "x") == d1
    assert parse_sha256_file(f"{d1.upper()} *{name}", name, "x") == d1
    assert parse_sha256_file(f"{d1}\n", name, "x") == d1
    assert parse_sha256_file(f"{d1}  other.tgz\n", name, "x") == d1
    assert parse_sha256_file(f"# c\n{d2}  other.tgz\n{d1}  ./dir/{name}\n", name, "x") == d1
    with pytest.raises(InstallError, match="none for"):
        parse_sha256_file(f"{d1}  a.tgz\n{d2}  b.tgz\n", name, "x")
    with pytest.raises(InstallError, match="conflicting"):
        parse_sha256_file(f"{d1}  {name}\n{d2}  {name}\n", name, "x")
    with pytest.raises(InstallError, match="no SHA-256"):
        parse_sha256_file("\n", name, "x")
    with pytest.raises(InstallError, match="line 1"):
        parse_sha256_file("SHA256 (x.tgz) = abc\n", name, "sums.txt")


async def test_progress_exception_aborts_cleanly(server: Server, dirs: dict[str, Path]) -> None:
    make_archive(official_path(server), standard_entries(padding=400_000))

    def boom(done: int, total: int | None) -> None:
        if done > 0:
            raise RuntimeError("user abort")

    with pytest.raises(RuntimeError, match="user abort"):
        await run(dirs, progress=boom)
    assert_nothing_installed(dirs)


async def test_cancel_during_download(server: Server, dirs: dict[str, Path]) -> None:
    make_archive(official_path(server), standard_entries(padding=400_000))
    task: asyncio.Task[InstallResult] | None = None

    def cancel_midway(done: int, total: int | None) -> None:
        if done > 0 and task is not None:
            task.cancel()

    task = asyncio.create_task(run(dirs, progress=cancel_midway))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_nothing_installed(dirs)


async def test_cancel_during_unpack_rolls_back(
    server: Server, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_archive(official_path(server))
    entered, release = threading.Event(), threading.Event()
    real_select = transaction._select_members

    def slow_select(*args: Any) -> Any:
        entered.set()
        release.wait(10)
        return real_select(*args)

    monkeypatch.setattr(transaction, "_select_members", slow_select)
    task = asyncio.create_task(run(dirs))
    while not entered.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.05)  # the task sets the worker's cancel flag and waits for it
    assert not task.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_nothing_installed(dirs)


# --------------------------------------------------------------------------- verification
# Before anything is committed, each staged binary must be an ELF executable for the arch and
# its `--version` (run from the staging location) must name its program and the release.


def prefix_state(prefix: Path) -> dict[str, tuple[str, bytes | str]]:
    state: dict[str, tuple[str, bytes | str]] = {}
    for path in sorted(prefix.iterdir()):
        if path.is_symlink():
            state[path.name] = ("link", os.readlink(path))
        else:
            state[path.name] = ("file", path.read_bytes())
    return state


@pytest.fixture
def old_install(dirs: dict[str, Path]) -> dict[str, tuple[str, bytes | str]]:
    """A prefix holding an earlier install: a refused one must leave it exactly so."""
    prefix = dirs["prefix"]
    prefix.mkdir()
    (prefix / "firecracker-v1.13.0").write_bytes(b"old firecracker")
    (prefix / "firecracker").symlink_to("firecracker-v1.13.0")
    (prefix / "jailer").write_bytes(b"old jailer")
    return prefix_state(prefix)


def binaries(fc: bytes, jailer: bytes) -> list[Entry]:
    return [reg(FC_MEMBER, fc), reg(JAILER_MEMBER, jailer)]


def _refused_cases() -> list[Any]:
    other = fake_elf.release_binary
    truncated = fake_elf.printing("Firecracker v1.14.1\n")[:64]  # header only
    cases = [
        ("shell-scripts", script("Firecracker"), script("Jailer"), FC_MEMBER, "is a script"),
        ("text-file", b"Firecracker v1.14.1\n", JAILER_BYTES, FC_MEMBER, "not an ELF"),
        ("random-bytes", FC_BYTES, os.urandom(4096), JAILER_MEMBER, "not an ELF"),
        ("not-executable", truncated, JAILER_BYTES, FC_MEMBER, "cannot be executed"),
        (
            "other-arch",
            FC_BYTES,
            fake_elf.printing("Jailer v1.14.1\n\n", machine="aarch64"),
            JAILER_MEMBER,
            "built for aarch64, not x86_64",
        ),
        (
            "jailer-is-firecracker",
            FC_BYTES,
            FC_BYTES,
            JAILER_MEMBER,
            "says it is firecracker ('Firecracker v1.14.1')",
        ),
        ("swapped", JAILER_BYTES, FC_BYTES, FC_MEMBER, "says it is jailer ('Jailer v1.14.1')"),
        (
            "banner-only",
            fake_elf.printing("firecracker 1.14.1\n"),
            JAILER_BYTES,
            FC_MEMBER,
            "got 'firecracker 1.14.1'",
        ),
        ("prints-nothing", fake_elf.printing(""), JAILER_BYTES, FC_MEMBER, "got nothing"),
        (
            "exit-status",
            FC_BYTES,
            fake_elf.printing("Jailer v1.14.1\n\n", exit_code=1),
            JAILER_MEMBER,
            "exited with status 1",
        ),
        (
            "floods",
            fake_elf.printing("Firecracker v1.14.1\n" + "x" * 100_000),
            JAILER_BYTES,
            FC_MEMBER,
            "printed more than",
        ),
        (
            "mixed-releases",
            FC_BYTES,
            other("jailer", "v1.13.0"),
            f"{FC_MEMBER} reports v1.14.1 but {JAILER_MEMBER} reports v1.13.0",
            "same release",
        ),
        (
            "mislabelled",
            other("firecracker", "v1.0.0-44-gc73a27cb-dirty"),
            other("jailer", "v1.0.0"),
            f"labelled v1.14.1 but its binaries ({FC_MEMBER}, {JAILER_MEMBER}) report v1.0.0-44",
            "--version v1.0.0",
        ),
    ]
    return [pytest.param(fc, jl, named, fragment, id=i) for i, fc, jl, named, fragment in cases]


@fake_elf.needs_x86_64
@pytest.mark.parametrize(("fc", "jailer", "named", "fragment"), _refused_cases())
async def test_binaries_that_are_not_what_they_claim_are_refused(
    server: Server,
    dirs: dict[str, Path],
    old_install: dict[str, tuple[str, bytes | str]],
    fc: bytes,
    jailer: bytes,
    named: str,
    fragment: str,
) -> None:
    make_archive(official_path(server), binaries(fc, jailer))

    with pytest.raises(InstallError) as excinfo:
        await run(dirs)

    message = str(excinfo.value)
    assert message.startswith(f"refusing archive {server.url}/"), message
    assert named in message and fragment in message, message
    assert "nothing was installed" in message
    assert prefix_state(dirs["prefix"]) == old_install  # no temporary file left either
    assert not dirs["chroot"].exists()
    assert list(dirs["tmp"].iterdir()) == []


@fake_elf.needs_x86_64
@pytest.mark.parametrize("fork", [False, True], ids=["hangs", "hangs-with-child"])
async def test_binary_that_hangs_on_version_is_killed_and_refused(
    server: Server,
    dirs: dict[str, Path],
    old_install: dict[str, tuple[str, bytes | str]],
    monkeypatch: pytest.MonkeyPatch,
    fork: bool,
) -> None:
    monkeypatch.setattr(verify, "VERSION_TIMEOUT_S", 1.0)
    make_archive(official_path(server), binaries(FC_BYTES, fake_elf.hanging(fork=fork)))

    with pytest.raises(InstallError) as excinfo:
        await run(dirs)

    message = str(excinfo.value)
    assert JAILER_MEMBER in message and "did not finish within 1 s (killed)" in message
    assert prefix_state(dirs["prefix"]) == old_install
    # (the leak guard fails this test if the binary, or the child it forked, still runs)


@fake_elf.needs_x86_64
async def test_cancel_while_version_runs_rolls_back_at_once(
    server: Server,
    dirs: dict[str, Path],
    old_install: dict[str, tuple[str, bytes | str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_archive(official_path(server), binaries(fake_elf.hanging(fork=True), JAILER_BYTES))
    started = threading.Event()
    real_run = verify._run_version

    def watched(path: Path, check_cancel: Callable[[], None]) -> tuple[int, str]:
        started.set()
        return real_run(path, check_cancel)

    monkeypatch.setattr(verify, "_run_version", watched)
    task = asyncio.create_task(run(dirs))
    async with asyncio.timeout(60):  # fails, not hangs, if --version is never run
        while not started.is_set() and not task.done():
            await asyncio.sleep(0.01)
    assert started.is_set(), task.exception()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, verify.VERSION_TIMEOUT_S / 2)  # not the timeout
    assert prefix_state(dirs["prefix"]) == old_install


@fake_elf.needs_x86_64
async def test_version_runs_from_staging_with_minimal_env(
    server: Server, dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    real_popen = verify.subprocess.Popen

    def spy(args: list[str], **kwargs: Any) -> Any:
        calls.append({"args": args, **kwargs})
        return real_popen(args, **kwargs)

    monkeypatch.setattr(verify.subprocess, "Popen", spy)
    monkeypatch.setenv("IRONCLAW_SECRET_FOR_TEST", "x")
    make_archive(official_path(server))

    result = await run(dirs)

    assert [Path(c["args"][0]).parent for c in calls] == [dirs["prefix"]] * 2
    names = [Path(c["args"][0]).name for c in calls]
    assert names[0].startswith(f".{result.firecracker.name}.") and names[1].startswith(".jailer.")
    assert all(name.endswith(".ironclaw-tmp") for name in names)  # the staged files
    assert all(c["args"][1:] == ["--version"] for c in calls)
    assert all(c.get("shell") in (None, False) and c["start_new_session"] for c in calls)
    assert all(set(c["env"]) == {"PATH", "LC_ALL"} for c in calls)


async def test_foreign_arch_is_checked_but_not_run(tmp_path: Path, dirs: dict[str, Path]) -> None:
    other = "aarch64" if host_arch() == "x86_64" else "x86_64"
    rel = f"release-{VERSION}-{other}"
    never_run = fake_elf.elf(b"\xeb\xfe", machine=other)  # jmp . (if it ever ran)
    archive = tmp_path / "mirror" / f"firecracker-{VERSION}-{other}.tgz"
    make_archive(
        archive,
        [
            reg(f"{rel}/firecracker-{VERSION}-{other}", never_run),
            reg(f"{rel}/jailer-{VERSION}-{other}", never_run),
        ],
    )

    result = await run(dirs, source=str(archive), arch=other)

    assert any("--version was not run" in n and other in n for n in result.notes)


async def test_foreign_arch_archive_with_host_binaries_is_refused(
    tmp_path: Path, dirs: dict[str, Path]
) -> None:
    other = "aarch64" if host_arch() == "x86_64" else "x86_64"
    rel = f"release-{VERSION}-{other}"
    archive = tmp_path / "mirror" / f"firecracker-{VERSION}-{other}.tgz"
    host_elf = fake_elf.printing("", machine=host_arch())
    make_archive(
        archive,
        [
            reg(f"{rel}/firecracker-{VERSION}-{other}", host_elf),
            reg(f"{rel}/jailer-{VERSION}-{other}", host_elf),
        ],
    )
    with pytest.raises(InstallError, match=f"built for {host_arch()}, not {other}"):
        await run(dirs, source=str(archive), arch=other)
    assert_nothing_installed(dirs)


@fake_elf.needs_x86_64
def test_cli_refusal_is_exit_5_with_the_reason(tmp_path: Path, dirs: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from ironclaw_orchestrator.cli import app
    from ironclaw_orchestrator.cli.common import ExitCode

    archive = tmp_path / "mirror" / ARCHIVE_NAME
    digest = make_archive(archive, binaries(FC_BYTES, FC_BYTES), checksum=False)
    result = CliRunner().invoke(app, [
        "install", "--version", VERSION, "--from", str(archive), "--sha256", digest,
        "--prefix", str(dirs["prefix"]), "--chroot-base", str(dirs["chroot"]),
    ])  # fmt: skip
    assert result.exit_code == ExitCode.INSTALL_FAILED, result.output
    assert (
        "says it is firecracker" in result.output and "installed Firecracker" not in result.output
    )
    assert not dirs["prefix"].exists()
