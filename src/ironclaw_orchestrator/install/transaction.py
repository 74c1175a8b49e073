"""Transactional install: stage hidden files next to their targets, commit, roll back.

Binaries are written as hidden temporary files in the prefix, then ``os.replace``-d into
place; a file they replace is kept as a hard-link backup until the whole install
succeeded. On any failure (or cancellation) every committed file is restored or removed,
every temporary file and every directory this install created is removed again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import InstallError
from .archive import _MAX_BINARY_SIZE, _select_members
from .fetch import _CHUNK
from .release import RELEASES_PAGE, _Plan
from .verify import Staged, verify_staged

_TMP_SUFFIX = ".ironclaw-tmp"
_BACKUP_SUFFIX = ".ironclaw-bak"


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

        def check_cancel() -> None:
            if cancel.is_set():
                raise _Cancelled

        # The staged files must be what they claim before anything replaces a thing.
        notes += verify_staged(
            plan,
            archive_display,
            [
                Staged("firecracker", staged_files[0].tmp, fc_member.name),
                Staged("jailer", staged_files[1].tmp, jailer_member.name),
            ],
            check_cancel,
        )

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
