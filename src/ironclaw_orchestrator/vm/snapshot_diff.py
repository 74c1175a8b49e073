"""Diff snapshots: merging Firecracker's dirty-page layer onto the base memory file.

Firecracker writes a Diff snapshot's memory as a *layer*: a file of the full guest size in
which only the dirty pages are written (v1.0 truncates the file first; v1.14 keeps an
existing file of the right size). Every other page is a hole. To keep each snapshot
directory complete by itself, the layer's data extents are copied over a copy of the base
snapshot's memory (what Firecracker's ``snapshot-editor edit-memory rebase`` does), and the
layer is dropped.

That needs a filesystem that reports holes (``SEEK_DATA``/``SEEK_HOLE``: ext4, xfs, btrfs,
tmpfs): elsewhere every page looks written and the merge would copy zeros over the base.
:func:`check_reports_holes` finds that out before the VM is paused.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ..errors import ConfigError
from .staging import data_extents

__all__ = ["check_reports_holes", "merge_layer"]

_PROBE_SIZE = 2 << 20
#: st_dev -> whether that filesystem reports holes (a fact of the filesystem).
_reports_holes: dict[int, bool] = {}


def check_reports_holes(directory: Path) -> None:
    """Refuse a directory whose filesystem does not report holes (see the module doc)."""
    dev = directory.stat().st_dev
    known = _reports_holes.get(dev)
    if known is None:
        probe = directory / f".holes-{os.getpid()}"
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, _PROBE_SIZE)
            os.pwrite(fd, b"x" * 4096, _PROBE_SIZE // 2)
            known = list(data_extents(fd, _PROBE_SIZE))[:1] != [(0, _PROBE_SIZE)]
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                probe.unlink()
        _reports_holes[dev] = known
    if not known:
        raise ConfigError(
            f"Diff snapshots need a filesystem that reports holes (SEEK_DATA/SEEK_HOLE: "
            f"ext4, xfs, btrfs, tmpfs), and {directory} is not on one: take a Full snapshot, "
            "or put the VM's jail (chroot_base_dir) on such a filesystem"
        )


def merge_layer(layer: Path, dest: Path) -> int:
    """Write ``layer``'s data extents over the same offsets of ``dest``; return the bytes.

    ``dest`` must already hold the base memory (same size as the layer).
    """
    with open(layer, "rb") as fin, open(dest, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        base_size = os.fstat(fout.fileno()).st_size
        if size != base_size:
            raise ConfigError(
                f"the Diff snapshot's memory is {size} bytes but its base's is {base_size}: "
                "the base is not a snapshot of this VM; take a Full snapshot"
            )
        fd_in, fd_out, merged = fin.fileno(), fout.fileno(), 0
        for start, end in data_extents(fd_in, size):
            pos = start
            while pos < end:
                n = os.copy_file_range(fd_in, fd_out, end - pos, pos, pos)
                if n == 0:
                    raise OSError(errno.EIO, f"short copy from {layer} at offset {pos}")
                pos += n
            merged += end - start
        os.fsync(fd_out)
    return merged
