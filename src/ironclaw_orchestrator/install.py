"""Install the Firecracker and Jailer binaries from an official release archive.

This is the library half of ``ironclaw install`` (the CLI is a thin layer on top); it never
prints, it reports progress through a callback and returns an :class:`InstallResult`.

What :func:`install_firecracker` does, in order:

1. validate the version (``vX.Y.Z``; ``X.Y.Z`` is accepted and normalised), the arch and an
   explicit ``sha256``; check that ``prefix`` and ``chroot_base_dir`` can be used;
2. find the expected SHA-256 of the archive: the ``sha256`` argument, else the
   ``<archive>.sha256.txt`` published next to the archive (the official release has one).
   Without either it refuses to install;
3. stream the archive (official URL, or ``source``: an http/https/file URL or a local path)
   into a private temporary directory, calling ``progress(bytes_done, total_or_None)``;
4. verify the SHA-256 *before* the archive is opened;
5. scan every tar member and refuse the archive if any member has an absolute path, a ``..``
   component, is a symlink/hard link pointing outside the archive, or is a device/FIFO;
   then extract *only* ``release-{v}-{arch}/firecracker-{v}-{arch}`` and
   ``release-{v}-{arch}/jailer-{v}-{arch}`` (which must be regular files) - never
   ``extractall``;
6. write them as hidden temporary files in ``prefix`` (mode 0755), create ``chroot_base_dir``
   if missing (0755, root-owned when running as root), then ``os.replace`` everything into
   place: ``prefix/firecracker-{v}``, ``prefix/jailer`` and (``link_default=True``, the default)
   the symlink ``prefix/firecracker -> firecracker-{v}``. A regular file called ``firecracker``
   is never clobbered; the result's ``notes`` say so instead.

Any failure raises :class:`~ironclaw_orchestrator.errors.InstallError` and leaves nothing
installed: temporary files are removed, files already moved into place are rolled back
(a file they replaced is restored from a hard-link backup) and directories created by this
call are removed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import platform
import posixpath
import re
import secrets
import tarfile
import tempfile
import threading
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import httpx

from .errors import InstallError

__all__ = [
    "DEFAULT_CHROOT_BASE_DIR",
    "DEFAULT_PREFIX",
    "DEFAULT_VERSION",
    "RELEASES_PAGE",
    "RELEASE_URL_TEMPLATE",
    "SUPPORTED_ARCHES",
    "InstallResult",
    "ProgressCallback",
    "host_arch",
    "install_firecracker",
    "normalize_version",
    "parse_sha256_file",
    "release_archive_url",
]

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

#: ``progress(bytes_done, total_bytes_or_None)``, called as the archive is read.
ProgressCallback = Callable[[int, int | None], None]

_VERSION_RE = re.compile(r"v?([0-9]+)\.([0-9]+)\.([0-9]+)", re.ASCII)
_HEX64_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_ARCH_ALIASES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
}
_CHUNK = 64 * 1024
_MAX_CHECKSUM_FILE = 64 * 1024
_MAX_BINARY_SIZE = 512 * 1024 * 1024
_DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=20.0)
_TMP_SUFFIX = ".ironclaw-tmp"
_BACKUP_SUFFIX = ".ironclaw-bak"


@dataclass(frozen=True, slots=True)
class InstallResult:
    """What :func:`install_firecracker` installed."""

    #: Normalised release version, e.g. ``v1.14.1``.
    version: str
    #: ``x86_64`` or ``aarch64``.
    arch: str
    #: The installed ``prefix/firecracker-{version}``.
    firecracker: Path
    #: The installed ``prefix/jailer``.
    jailer: Path
    #: The ``prefix/firecracker`` symlink if it was created/updated, else ``None``.
    default_link: Path | None
    #: Every path created or replaced in ``prefix`` (binaries, then the symlink if any).
    installed_paths: tuple[Path, ...]
    #: The jailer chroot base directory (it exists after a successful install).
    chroot_base_dir: Path
    #: ``True`` if this install created ``chroot_base_dir``.
    chroot_base_created: bool
    #: The verified SHA-256 of the archive (lower-case hex).
    sha256: str
    #: Where the archive came from (URL or absolute local path).
    source: str
    #: Where the expected checksum came from: ``"--sha256"`` or the checksum file's URL/path.
    sha256_source: str
    #: Human-readable remarks: files replaced, a ``firecracker`` file left alone, ...
    notes: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------- small helpers


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


def _normalize_sha256(value: str) -> str:
    digest = value.strip().lower()
    digest = digest.removeprefix("sha256:")
    if _HEX64_RE.fullmatch(digest) is None:
        raise InstallError(
            f"invalid SHA-256 {value!r}: expected 64 hexadecimal characters; pass the "
            "archive's checksum (e.g. from `sha256sum <archive>`) to --sha256"
        )
    return digest


def parse_sha256_file(text: str, filename: str, origin: str) -> str:
    """Extract the archive digest from a ``sha256sum``-style checksum file.

    Accepts ``<hex>  <name>`` lines (a ``*`` before the name is allowed) and a bare ``<hex>``.
    The line for ``filename`` wins; a file with a single digest is used whatever its name.
    ``origin`` (URL/path of the file) is only used in error messages.
    """
    entries: list[tuple[str, str | None]] = []
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(None, 1)
        digest = fields[0].lower()
        if _HEX64_RE.fullmatch(digest) is None:
            raise InstallError(
                f"checksum file {origin} line {lineno} is not '<sha256>  <file>': "
                f"{raw_line[:120]!r}; fix the file or pass --sha256 explicitly"
            )
        name = fields[1].strip().lstrip("*") if len(fields) > 1 else None
        entries.append((digest, name))
    if not entries:
        raise InstallError(
            f"checksum file {origin} contains no SHA-256; fix the file or pass --sha256"
        )
    matching = {d for d, n in entries if n is not None and PurePosixPath(n).name == filename}
    if len(matching) == 1:
        return matching.pop()
    if len(matching) > 1:
        raise InstallError(
            f"checksum file {origin} lists conflicting SHA-256 values for {filename}; "
            "fix the file or pass --sha256 explicitly"
        )
    if len(entries) == 1:
        return entries[0][0]
    raise InstallError(
        f"checksum file {origin} lists {len(entries)} checksums but none for {filename}; "
        "pass --sha256 explicitly"
    )


@dataclass(frozen=True, slots=True)
class _Location:
    """An archive or checksum location: an http(s) URL or a local path."""

    display: str
    url: str | None = None
    path: Path | None = None

    @property
    def filename(self) -> str:
        if self.path is not None:
            return self.path.name
        assert self.url is not None
        return PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(self.url).path)).name

    def with_suffix_appended(self, suffix: str) -> _Location:
        if self.path is not None:
            sibling = self.path.with_name(self.path.name + suffix)
            return _Location(display=str(sibling), path=sibling)
        assert self.url is not None
        parts = urllib.parse.urlsplit(self.url)
        url = urllib.parse.urlunsplit(parts._replace(path=parts.path + suffix))
        return _Location(display=url, url=url)


def _parse_source(source: str) -> _Location:
    text = source.strip()
    if not text:
        raise InstallError(
            "empty --from: pass the URL (http/https/file) or the path of a Firecracker "
            "release archive"
        )
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            if not parts.netloc:
                raise InstallError(f"invalid --from URL {text!r}: it has no host; fix the URL")
            return _Location(display=text, url=text)
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise InstallError(
                    f"unsupported --from URL {text!r}: file URLs must be local "
                    "(file:///path/to/archive.tgz); copy the archive here and pass its path"
                )
            path = Path(urllib.request.url2pathname(parts.path))
            return _Location(display=str(path), path=path)
        raise InstallError(
            f"unsupported --from URL scheme {parts.scheme!r} in {text!r}: use an http://, "
            "https:// or file:// URL, or a local path"
        )
    path = Path(text).expanduser().absolute()
    return _Location(display=str(path), path=path)


def _content_length(response: httpx.Response) -> int | None:
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        return None  # the decoded size is unknown
    value = response.headers.get("content-length")
    if value is None or not value.isdigit():
        return None
    return int(value)


def _report(progress: ProgressCallback | None, done: int, total: int | None) -> None:
    if progress is not None:
        progress(done, total)


# --------------------------------------------------------------------------- fetching


async def _fetch_checksum_file(client: httpx.AsyncClient, location: _Location) -> str | None:
    """Return the text of a checksum file, or ``None`` if it does not exist."""
    if location.path is not None:
        try:
            with location.path.open("rb") as fh:
                data = fh.read(_MAX_CHECKSUM_FILE + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InstallError(
                f"could not read checksum file {location.display}: {exc.strerror or exc}; "
                "fix its permissions or pass --sha256 explicitly"
            ) from exc
    else:
        assert location.url is not None
        try:
            async with client.stream("GET", location.url, follow_redirects=True) as response:
                if response.status_code in (404, 410):
                    return None
                if response.status_code != 200:
                    raise InstallError(
                        f"could not download checksum file {location.url}: HTTP "
                        f"{response.status_code} {response.reason_phrase}; retry later or "
                        "pass --sha256 explicitly"
                    )
                buf = bytearray()
                async for chunk in response.aiter_bytes():
                    buf += chunk
                    if len(buf) > _MAX_CHECKSUM_FILE:
                        break
                data = bytes(buf)
        except httpx.HTTPError as exc:
            raise InstallError(
                f"could not download checksum file {location.url}: {exc!r}; check the "
                "network/proxy settings, or on air-gapped hosts use --from with a local "
                "archive and --sha256"
            ) from exc
    if len(data) > _MAX_CHECKSUM_FILE:
        raise InstallError(
            f"checksum file {location.display} is larger than {_MAX_CHECKSUM_FILE} bytes, "
            "so it is not a .sha256.txt file; fix the file or pass --sha256 explicitly"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InstallError(
            f"checksum file {location.display} is not UTF-8 text; fix the file or pass "
            "--sha256 explicitly"
        ) from exc


async def _download(
    client: httpx.AsyncClient,
    url: str,
    dest: Path,
    progress: ProgressCallback | None,
    not_found_hint: str,
) -> str:
    """Stream ``url`` into ``dest``; return the SHA-256 of the bytes written."""
    digest = hashlib.sha256()
    try:
        async with client.stream("GET", url, follow_redirects=True) as response:
            if response.status_code != 200:
                hint = (
                    not_found_hint
                    if response.status_code in (404, 410)
                    else "retry later, check the network/proxy settings, or on air-gapped "
                    "hosts use --from with a local archive"
                )
                raise InstallError(
                    f"could not download {url}: HTTP {response.status_code} "
                    f"{response.reason_phrase}; {hint}"
                )
            total = _content_length(response)
            done = 0
            _report(progress, 0, total)
            with dest.open("wb") as out:
                async for chunk in response.aiter_bytes(_CHUNK):
                    if not chunk:
                        continue
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    _report(progress, done, total)
            if total is not None and done != total:
                raise InstallError(
                    f"download of {url} was truncated: got {done} of {total} bytes; retry"
                )
    except httpx.HTTPError as exc:
        raise InstallError(
            f"could not download {url}: {exc!r}; check the network/proxy settings, or on "
            "air-gapped hosts use --from with a local archive"
        ) from exc
    except OSError as exc:
        raise InstallError(
            f"could not write the download to {dest}: {exc.strerror or exc}; free some "
            "space or point TMPDIR/tmp_dir at a writable directory"
        ) from exc
    return digest.hexdigest()


async def _copy_local(src: Path, dest: Path, progress: ProgressCallback | None) -> str:
    """Copy a local archive into ``dest`` (so it cannot change after hashing)."""
    digest = hashlib.sha256()
    try:
        with src.open("rb") as inp, dest.open("wb") as out:
            total = os.fstat(inp.fileno()).st_size
            done = 0
            _report(progress, 0, total)
            while chunk := inp.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                _report(progress, done, total)
                await asyncio.sleep(0)  # stay cancellable, let other tasks run
    except FileNotFoundError as exc:
        raise InstallError(f"archive {src} does not exist; check the --from path (or URL)") from exc
    except IsADirectoryError as exc:
        raise InstallError(
            f"archive {src} is a directory; pass the .tgz file itself to --from"
        ) from exc
    except OSError as exc:
        raise InstallError(
            f"could not copy archive {src} to {dest}: {exc.strerror or exc}; check "
            "permissions and free space"
        ) from exc
    return digest.hexdigest()


# --------------------------------------------------------------------------- tar checks


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


# --------------------------------------------------------------------------- committing


class _Cancelled(Exception):
    """Internal: the awaiting task was cancelled; roll back."""


@dataclass(slots=True)
class _Staged:
    tmp: Path
    final: Path
    backup: Path | None = None
    committed: bool = False


def _hidden_name(final: Path, suffix: str) -> Path:
    return final.with_name(f".{final.name}.{secrets.token_hex(6)}{suffix}")


def _write_member(tf: tarfile.TarFile, member: tarfile.TarInfo, final: Path) -> _Staged:
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=_TMP_SUFFIX)
    staged = _Staged(tmp=Path(tmp_name), final=final)
    try:
        with os.fdopen(fd, "wb") as out:
            src: IO[bytes] | None = tf.extractfile(member)
            if src is None:  # pragma: no cover - isreg() was checked
                raise InstallError(f"could not read {member.name} from the archive")
            with src:
                written = 0
                while chunk := src.read(_CHUNK):
                    written += len(chunk)
                    if written > _MAX_BINARY_SIZE:  # pragma: no cover - size was checked
                        raise InstallError(f"{member.name} is larger than its header says")
                    out.write(chunk)
            os.fchmod(out.fileno(), 0o755)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            staged.tmp.unlink()
        raise
    return staged


def _stage_symlink(target: str, final: Path) -> _Staged:
    for _ in range(10):
        tmp = _hidden_name(final, _TMP_SUFFIX)
        try:
            os.symlink(target, tmp)
        except FileExistsError:  # pragma: no cover - 48 random bits collided
            continue
        return _Staged(tmp=tmp, final=final)
    raise InstallError(f"could not create a temporary symlink next to {final}")  # pragma: no cover


def _make_dirs(path: Path, created: list[Path]) -> None:
    """``mkdir -p`` with mode 0755 (root-owned as root); record the directories created."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        if current.is_symlink():
            raise InstallError(
                f"{current} is a dangling symlink; remove it or point it at a directory"
            )
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o755)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # someone else created it concurrently; not ours to remove
        created.append(directory)
        os.chmod(directory, 0o755)  # mkdir's mode is masked by the umask
        if os.geteuid() == 0:
            os.chown(directory, 0, 0)


def _commit(staged: _Staged) -> None:
    if os.path.lexists(staged.final):
        # Keep the file we replace (as a hard link) so a later failure can restore it.
        backup = _hidden_name(staged.final, _BACKUP_SUFFIX)
        with contextlib.suppress(OSError):  # best effort: without it, rollback only removes
            os.link(staged.final, backup, follow_symlinks=False)
            staged.backup = backup
    os.replace(staged.tmp, staged.final)
    staged.committed = True


def _rollback(staged_files: list[_Staged], created_dirs: list[Path]) -> None:
    for staged in reversed(staged_files):
        with contextlib.suppress(OSError):
            if staged.committed:
                if staged.backup is not None:
                    os.replace(staged.backup, staged.final)
                    staged.backup = None
                else:
                    staged.final.unlink()
            else:
                staged.tmp.unlink()
        if staged.backup is not None:
            with contextlib.suppress(OSError):
                staged.backup.unlink()
    for directory in reversed(created_dirs):
        with contextlib.suppress(OSError):
            directory.rmdir()


@contextlib.contextmanager
def _os_errors(what: str, fix: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise InstallError(f"{what}{where}: {exc.strerror or exc}; {fix}") from exc


def _unpack_and_install(
    plan: _Plan,
    archive: Path,
    archive_display: str,
    cancel: threading.Event,
) -> tuple[list[Path], Path | None, bool, list[str]]:
    """Extract the two binaries into ``plan.prefix`` and commit them. Runs in a thread."""
    notes: list[str] = []
    staged_files: list[_Staged] = []
    created_dirs: list[Path] = []
    write_fix = "run as root, or choose a writable --prefix"
    try:
        try:
            with tarfile.open(archive, "r:*") as tf:
                fc_member, jailer_member = _select_members(tf, plan, archive_display)
                if cancel.is_set():
                    raise _Cancelled
                with _os_errors(f"could not create {plan.prefix}", write_fix):
                    _make_dirs(plan.prefix, created_dirs)
                with _os_errors(f"could not write into {plan.prefix}", write_fix):
                    staged_files.append(_write_member(tf, fc_member, plan.firecracker_path))
                    if cancel.is_set():
                        raise _Cancelled
                    staged_files.append(_write_member(tf, jailer_member, plan.jailer_path))
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            # OSErrors of our own writes were turned into InstallError above; these are
            # decompression/read errors (e.g. gzip.BadGzipFile).
            raise InstallError(
                f"archive {archive_display} is not a readable tar archive or is corrupt "
                f"({exc}); re-download it from {RELEASES_PAGE}"
            ) from exc

        link: Path | None = None
        if plan.link_default:
            target = plan.firecracker_path.name
            if os.path.lexists(plan.link_path) and not plan.link_path.is_symlink():
                notes.append(
                    f"{plan.link_path} exists and is not a symlink, so it was left alone "
                    f"(not pointed at {target}); remove it and re-install to make "
                    f"{target} the default, or run {plan.firecracker_path} directly"
                )
            else:
                with _os_errors(f"could not create a symlink in {plan.prefix}", write_fix):
                    staged_files.append(_stage_symlink(target, plan.link_path))
                link = plan.link_path
                if plan.link_path.is_symlink():
                    old = os.readlink(plan.link_path)
                    if old != target:
                        notes.append(f"repointed {plan.link_path} from {old} to {target}")

        chroot_created = not os.path.lexists(plan.chroot_base_dir)
        with _os_errors(
            f"could not create the chroot base directory {plan.chroot_base_dir}",
            "run as root, or pass a writable --chroot-base-dir",
        ):
            _make_dirs(plan.chroot_base_dir, created_dirs)
        if not plan.chroot_base_dir.is_dir():
            raise InstallError(
                f"chroot base {plan.chroot_base_dir} exists but is not a directory; remove "
                "it or pass another --chroot-base-dir"
            )

        if cancel.is_set():
            raise _Cancelled
        for staged in staged_files:
            if staged.final != link and os.path.lexists(staged.final):
                notes.append(f"replaced existing {staged.final}")
        with _os_errors(f"could not install into {plan.prefix}", write_fix):
            for staged in staged_files:
                _commit(staged)
    except BaseException:
        _rollback(staged_files, created_dirs)
        raise
    for staged in staged_files:
        if staged.backup is not None:
            with contextlib.suppress(OSError):
                staged.backup.unlink()
    return [s.final for s in staged_files], link, chroot_created, notes


def _preflight(plan: _Plan) -> None:
    """Fail early (before downloading) on a prefix or chroot base that cannot work."""
    prefix = plan.prefix
    if prefix.exists() and not prefix.is_dir():
        raise InstallError(
            f"install prefix {prefix} exists but is not a directory; pass another --prefix"
        )
    existing = prefix
    while not existing.exists():
        if existing.parent == existing:  # pragma: no cover - "/" always exists
            break
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InstallError(
            f"install prefix {prefix} is not writable ({existing} is not a writable "
            "directory); run as root, or choose a writable --prefix"
        )
    for target in (plan.firecracker_path, plan.jailer_path):
        if target.is_dir() and not target.is_symlink():
            raise InstallError(
                f"{target} is a directory, so it cannot be replaced by the binary; remove it "
                "or choose another --prefix"
            )
    base = plan.chroot_base_dir
    if os.path.lexists(base) and not base.is_dir():
        raise InstallError(
            f"chroot base {base} exists but is not a directory; remove it or pass another "
            "--chroot-base-dir"
        )


# --------------------------------------------------------------------------- entry point


async def install_firecracker(
    version: str = DEFAULT_VERSION,
    prefix: Path = DEFAULT_PREFIX,
    *,
    source: str | None = None,
    sha256: str | None = None,
    chroot_base_dir: Path = DEFAULT_CHROOT_BASE_DIR,
    link_default: bool = True,
    arch: str | None = None,
    progress: ProgressCallback | None = None,
    client: httpx.AsyncClient | None = None,
    tmp_dir: Path | None = None,
) -> InstallResult:
    """Download, verify and install ``firecracker-{version}`` and ``jailer`` into ``prefix``.

    :param version: release, ``vX.Y.Z`` or ``X.Y.Z`` (normalised to ``vX.Y.Z``).
    :param prefix: directory receiving ``firecracker-{version}``, ``jailer`` and the
        ``firecracker`` symlink; created (0755) if missing.
    :param source: archive to install instead of the official download (CLI ``--from``):
        an ``http://``/``https://``/``file://`` URL or a local path. Its checksum comes from
        ``sha256`` or from ``<source>.sha256.txt``; with neither the install is refused.
    :param sha256: expected SHA-256 of the archive (hex, optionally ``sha256:``-prefixed).
        Takes precedence over any ``.sha256.txt``.
    :param chroot_base_dir: the jailer's chroot base; created (0755, root-owned when run as
        root) if missing, left untouched if it exists.
    :param link_default: also point the symlink ``prefix/firecracker`` at
        ``firecracker-{version}`` (default ``True``, so ``firecracker`` on ``PATH`` is the
        freshly installed release). An existing symlink is repointed; a regular file or
        directory called ``firecracker`` is never replaced - ``notes`` says so instead.
    :param arch: ``x86_64`` or ``aarch64``; default: this host's (``platform.machine()``).
    :param progress: ``progress(bytes_done, total_or_None)`` while the archive is read.
    :param client: an ``httpx.AsyncClient`` to use (redirects are followed per request);
        by default a private client with timeouts is created and closed.
    :param tmp_dir: where the archive is staged (default: the system temp directory).
    :raises InstallError: on any failure; nothing is left installed or half-written.
    """
    plan = _Plan(
        version=normalize_version(version),
        arch=host_arch(arch),
        prefix=Path(prefix).expanduser().absolute(),
        chroot_base_dir=Path(chroot_base_dir).expanduser().absolute(),
        link_default=link_default,
    )
    expected = _normalize_sha256(sha256) if sha256 is not None else None

    if source is None:
        official = RELEASE_URL_TEMPLATE.format(version=plan.version, arch=plan.arch)
        location = _Location(display=official, url=official)
        not_found_hint = (
            f"check that --version {plan.version} exists at {RELEASES_PAGE} and publishes "
            f"an {plan.arch} archive; on air-gapped hosts use --from with a local archive"
        )
    else:
        location = _parse_source(source)
        not_found_hint = (
            "check the --from URL; on air-gapped hosts use --from with a local archive path"
        )
    _preflight(plan)

    own_client = client is None
    http = (
        client
        if client is not None
        else httpx.AsyncClient(follow_redirects=True, timeout=_DEFAULT_TIMEOUT)
    )
    try:
        if expected is not None:
            sha256_source = "--sha256"
        else:
            checksum_location = location.with_suffix_appended(CHECKSUM_SUFFIX)
            text = await _fetch_checksum_file(http, checksum_location)
            if text is None:
                raise InstallError(
                    f"no checksum for {location.display}: {checksum_location.display} does "
                    "not exist, and refusing to install an unverified archive; pass the "
                    "archive's SHA-256 with --sha256 (or put a '<sha256>  <file>' line in "
                    f"{checksum_location.display})"
                )
            expected = parse_sha256_file(text, location.filename, checksum_location.display)
            sha256_source = checksum_location.display

        base = None if tmp_dir is None else str(tmp_dir)
        try:
            workdir_cm = tempfile.TemporaryDirectory(prefix="ironclaw-install-", dir=base)
        except OSError as exc:
            raise InstallError(
                f"could not create a temporary directory in {base or tempfile.gettempdir()}: "
                f"{exc.strerror or exc}; point TMPDIR (or tmp_dir) at a writable directory"
            ) from exc
        with workdir_cm as workdir:
            archive = Path(workdir) / (location.filename or "firecracker.tgz")
            if location.path is not None:
                actual = await _copy_local(location.path, archive, progress)
            else:
                assert location.url is not None
                actual = await _download(http, location.url, archive, progress, not_found_hint)

            if actual != expected:
                raise InstallError(
                    f"checksum mismatch for {location.display}: expected {expected} (from "
                    f"{sha256_source}), got {actual}; nothing was installed. The download may "
                    "be corrupt or tampered with: retry, check the --from archive, or pass "
                    "the correct --sha256"
                )

            cancel = threading.Event()
            future = asyncio.ensure_future(
                asyncio.to_thread(_unpack_and_install, plan, archive, location.display, cancel)
            )
            try:
                installed, link, chroot_created, notes = await asyncio.shield(future)
            except asyncio.CancelledError:
                # Let the worker roll back before the temporary directory disappears.
                cancel.set()
                with contextlib.suppress(BaseException):
                    await future
                raise
            except _Cancelled:  # pragma: no cover - only set on cancellation
                raise asyncio.CancelledError from None
    finally:
        if own_client:
            await http.aclose()

    return InstallResult(
        version=plan.version,
        arch=plan.arch,
        firecracker=plan.firecracker_path,
        jailer=plan.jailer_path,
        default_link=link,
        installed_paths=tuple(installed),
        chroot_base_dir=plan.chroot_base_dir,
        chroot_base_created=chroot_created,
        sha256=actual,
        source=location.display,
        sha256_source=sha256_source,
        notes=tuple(notes),
    )
