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
6. write them as hidden temporary files in ``prefix`` (mode 0755) and verify them there:
   each must be an ELF executable for ``arch`` and, when that is this host's arch, its
   ``--version`` (no shell, minimal environment, timeout) must print ``Firecracker vX.Y.Z``
   / ``Jailer vX.Y.Z`` with the requested release for both (see :mod:`.verify`);
7. create ``chroot_base_dir``
   if missing (0755, root-owned when running as root), then ``os.replace`` everything into
   place: ``prefix/firecracker-{v}``, ``prefix/jailer`` and (``link_default=True``, the default)
   the symlink ``prefix/firecracker -> firecracker-{v}``. A regular file called ``firecracker``
   is never clobbered; the result's ``notes`` say so instead.

Any failure raises :class:`~ironclaw_orchestrator.errors.InstallError` and leaves nothing
installed: temporary files are removed, files already moved into place are rolled back
(a file they replaced is restored from a hard-link backup) and directories created by this
call are removed again.

Layout: :mod:`.release` (versions, arches, URL, archive layout; pure), :mod:`.fetch`
(download, local copy, checksum file), :mod:`.archive` (member checks and selection),
:mod:`.verify` (the staged binaries are the release they claim), :mod:`.transaction`
(stage, commit, roll back); this module ties them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InstallError
from .fetch import (
    ProgressCallback,
    _copy_local,
    _download,
    _fetch_checksum_file,
    _Location,
    _normalize_sha256,
    _parse_source,
    default_timeout,
    parse_sha256_file,
)
from .release import (
    CHECKSUM_SUFFIX,
    DEFAULT_CHROOT_BASE_DIR,
    DEFAULT_PREFIX,
    DEFAULT_VERSION,
    RELEASE_URL_TEMPLATE,
    RELEASES_PAGE,
    SUPPORTED_ARCHES,
    _Plan,
    host_arch,
    normalize_version,
    release_archive_url,
)
from .transaction import _Cancelled, _preflight, _unpack_and_install

if TYPE_CHECKING:
    import httpx

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
    http = client if client is not None else _new_client()
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


def _new_client() -> httpx.AsyncClient:
    import httpx  # only to download: importing httpx loads click and rich if installed

    return httpx.AsyncClient(follow_redirects=True, timeout=default_timeout())
