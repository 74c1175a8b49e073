"""Getting the archive and its checksum: download, local copy, ``.sha256.txt`` parsing.

The archive is streamed into a private file (never used in place, so it cannot change
after hashing) while its SHA-256 is computed; progress goes to a callback.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..errors import InstallError

if TYPE_CHECKING:
    import httpx

#: ``progress(bytes_done, total_bytes_or_None)``, called as the archive is read.
ProgressCallback = Callable[[int, int | None], None]

_HEX64_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_CHUNK = 64 * 1024
_MAX_CHECKSUM_FILE = 64 * 1024


def default_timeout() -> httpx.Timeout:
    import httpx  # only when downloading: importing httpx loads click and rich if installed

    return httpx.Timeout(60.0, connect=20.0)


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
    if value is None or not value.isdecimal():
        return None
    return int(value)


def _report(progress: ProgressCallback | None, done: int, total: int | None) -> None:
    if progress is not None:
        progress(done, total)


async def _fetch_checksum_file(client: httpx.AsyncClient, location: _Location) -> str | None:
    """Return the text of a checksum file, or ``None`` if it does not exist."""
    import httpx

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
    import httpx

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
