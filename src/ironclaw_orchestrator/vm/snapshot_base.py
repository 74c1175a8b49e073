"""Which snapshot a Diff snapshot of a running VM builds on, for callers without its handle.

Firecracker resets a VM's dirty-page log whenever it writes a snapshot, so a Diff is only
complete on top of the VM's *latest* snapshot (or, for a restored VM that took none since,
the snapshot it was restored from). A :class:`~.FirecrackerProcess` remembers that in
memory (``last_snapshot``); ``ironclaw vm snapshot ID DIR --diff`` runs in another process,
so every snapshot also leaves a note in the VM's jail directory (root's, outside the
chroot: the VMM cannot touch it; removed with the jail):

* ``last-snapshot.json`` says ``{"path": null}`` from just before Firecracker is asked to
  write a snapshot until the snapshot is sealed, then names it (path, creation time, memory
  SHA-256). A crash or failure in between leaves ``null``: no valid base, so a Diff is
  refused rather than merged onto the wrong memory;
* no note: the VM took no snapshot since it started. A restored VM's dirty pages are then
  relative to the snapshot it was restored from, whose memory file is hard-linked in its
  jail (``/memory``): a base is accepted only if it is that very inode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError, UsageError
from .snapshot_dir import CLONE_MEMORY, MEMORY, Snapshot

__all__ = ["LAST_SNAPSHOT", "check_handle_base", "diff_base", "forget_base", "remember_base"]

LAST_SNAPSHOT = "last-snapshot.json"


def _write(jail_dir: Path, data: dict[str, str | None]) -> None:
    tmp = jail_dir / f".{LAST_SNAPSHOT}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(data) + "\n")
    os.replace(tmp, jail_dir / LAST_SNAPSHOT)


def forget_base(jail_dir: Path) -> None:
    """Before Firecracker writes a snapshot: no earlier one is a valid base any more."""
    _write(jail_dir, {"path": None})


def remember_base(jail_dir: Path, snap: Snapshot) -> None:
    """After ``snap`` (of the VM jailed in ``jail_dir``) is sealed: it is the base now."""
    _write(
        jail_dir,
        {
            "path": str(snap.path),
            "created_at": snap.manifest.created_at.isoformat(),
            "memory_sha256": snap.manifest.files[MEMORY].sha256,
        },
    )


def diff_base(vm_id: str, jail_dir: Path, given: Path | None) -> Snapshot:
    """The verified snapshot a Diff of the VM in ``jail_dir`` must build on.

    ``given`` is the caller's ``--base`` (needed only for a restored VM that took no
    snapshot since). Raises ``UsageError`` when there is no valid base or ``given`` is not
    it, ``ConfigError`` when the base is damaged.
    """
    note = _read_note(vm_id, jail_dir)
    if note is not None:
        return _noted_base(vm_id, note, given)
    if given is None:
        raise UsageError(
            f"VM {vm_id} has no snapshot to build a Diff on: it took none since it started. "
            "For a VM restored from a snapshot, pass that snapshot with --base DIR; "
            "otherwise take a Full snapshot first"
        )
    base = Snapshot.load(given)
    if not _same_file(jail_dir / "root" / CLONE_MEMORY.name, base.memory_path):
        raise UsageError(
            f"VM {vm_id} was not restored from {given} (or its memory was copied, not "
            "linked, into its jail), so its dirty pages are not relative to it: take a Full "
            "snapshot"
        )
    return base


def check_handle_base(vm_id: str, jail_dir: Path, base: Snapshot) -> None:
    """A handle's remembered Diff base must still be the VM's latest snapshot.

    Another process (``ironclaw vm snapshot ID DIR``) may have snapshotted the VM since,
    which reset its dirty-page log: a Diff on the handle's base would then miss the pages
    dirtied before that snapshot. No note: no snapshot was taken since the VM started, so
    the handle's base is the snapshot it was restored from.
    """
    note = _read_note(vm_id, jail_dir)
    if note is None:
        return
    path = note.get("path")
    if (
        path is None
        or os.path.realpath(path) != os.path.realpath(base.path)
        or note.get("created_at") != base.manifest.created_at.isoformat()
    ):
        latest = "an unfinished one" if path is None else path
        raise UsageError(
            f"VM {vm_id}: its latest snapshot is {latest}, not {base.path} (another process "
            "snapshotted it since), so a Diff on this handle's base would miss pages: take a "
            "Full snapshot"
        )


def _read_note(vm_id: str, jail_dir: Path) -> dict[str, str | None] | None:
    try:
        note = json.loads((jail_dir / LAST_SNAPSHOT).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"VM {vm_id}: {jail_dir / LAST_SNAPSHOT} is unreadable: {exc}") from None
    if not isinstance(note, dict):
        raise ConfigError(f"VM {vm_id}: {jail_dir / LAST_SNAPSHOT} is not a JSON object")
    return note


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _noted_base(vm_id: str, note: dict[str, str | None], given: Path | None) -> Snapshot:
    path = note.get("path")
    if path is None:
        raise UsageError(
            f"VM {vm_id}: its last snapshot did not complete, so no snapshot holds the pages "
            "its dirty-page log is relative to: take a Full snapshot"
        )
    if given is not None and os.path.realpath(given) != os.path.realpath(path):
        raise UsageError(
            f"VM {vm_id}: a Diff builds on its latest snapshot, {path}, not {given}: leave "
            "out --base, or take a Full snapshot"
        )
    try:
        base = Snapshot.load(path)
    except ConfigError as exc:
        raise ConfigError(f"VM {vm_id}: the base of a Diff, its latest snapshot: {exc}") from None
    manifest = base.manifest
    if manifest.created_at.isoformat() != note.get("created_at") or manifest.files[
        MEMORY
    ].sha256 != note.get("memory_sha256"):
        raise UsageError(
            f"VM {vm_id}: {path} is no longer the snapshot it took last (replaced since): "
            "take a Full snapshot"
        )
    return base
