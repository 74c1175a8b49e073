"""The whole-disk block device (``MAJ:MIN``) holding a file, for io throttling.

cgroup io limits name a device; they must name the disk, not a partition (the kernel
rejects partitions in ``io.max`` / ``blkio.throttle.*``). ``/sys/dev/block/MAJ:MIN`` links to
the device's sysfs directory; a partition's directory has a ``partition`` file and sits inside
its disk's directory, whose ``dev`` file holds the disk's ``MAJ:MIN``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import CgroupError


def whole_disk(major: int, minor: int, sysfs: Path = Path("/sys")) -> str:
    """``MAJ:MIN`` of the disk for block device ``major:minor`` (itself if not a partition)."""
    dev = f"{major}:{minor}"
    link = sysfs / "dev" / "block" / dev
    if not link.exists():
        raise CgroupError(
            f"device {dev} is not a block device ({link} is missing): the VM's disks live on a "
            "file system without a backing disk (tmpfs, overlay, NFS, btrfs subvolume...); "
            "io limits (io_read_bps/io_write_bps/io_read_iops/io_write_iops) need the disks on "
            "a block device, or unset them",
            controller="io",
            path=str(link),
            value=dev,
        )
    if not (link / "partition").exists():
        return dev
    parent_dev = link.resolve().parent / "dev"
    try:
        return parent_dev.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CgroupError(
            f"cannot find the disk of partition {dev}: reading {parent_dev} failed "
            f"({exc.strerror}); set the io limits' device by hand",
            controller="io",
            path=str(parent_dev),
            value=dev,
        ) from exc


def disk_device_for(path: Path, sysfs: Path = Path("/sys")) -> str:
    """``MAJ:MIN`` of the whole disk holding ``path`` (e.g. the VM's rootfs)."""
    st = os.stat(path)
    return whole_disk(os.major(st.st_dev), os.minor(st.st_dev), sysfs)
