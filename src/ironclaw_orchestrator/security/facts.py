"""What a confinement policy must know about one VM's jail, derived from its ``VmConfig``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..vm import KERNEL_JAIL_PATH, ROOTFS_JAIL_PATH
from ..vm.config import VmConfig
from ..vm.rundir import CONSOLE_LOG, vm_run_dir
from ..vm.seccomp import SECCOMP_FILTER_JAIL_PATH


@dataclass(frozen=True)
class JailFacts:
    """Host and jail-relative paths of one jailed VM, and which devices it uses."""

    vm_id: str
    jailer_binary: Path
    #: The firecracker binary the jailer copies into the jail (symlinks resolved).
    exec_source: Path
    chroot_base: Path
    api_sock: PurePosixPath
    kernel: PurePosixPath
    rootfs: PurePosixPath | None
    rootfs_read_only: bool
    networking: bool
    vsock_uds: PurePosixPath | None
    seccomp_filter: PurePosixPath | None
    #: Firecracker's stdout/stderr (serial console + log), opened by us before the jailer.
    console_log: Path

    @property
    def exec_name(self) -> str:
        return self.exec_source.name

    @property
    def jail_dir(self) -> Path:
        return self.chroot_base / self.exec_name / self.vm_id

    @property
    def chroot(self) -> Path:
        return self.jail_dir / "root"

    @property
    def exec_in_jail(self) -> PurePosixPath:
        return PurePosixPath("/") / self.exec_name

    @property
    def policy_name(self) -> str:
        """``ironclaw_<id>`` with characters every policy language accepts."""
        return "ironclaw_" + re.sub(r"[^A-Za-z0-9]", "_", self.vm_id).lower()

    def jail_files(self) -> list[tuple[PurePosixPath, str]]:
        """Every file the VMM opens, jail-relative, with ``r`` or ``rw``."""
        files = [(self.exec_in_jail, "r"), (self.kernel, "r")]
        if self.rootfs is not None:
            files.append((self.rootfs, "r" if self.rootfs_read_only else "rw"))
        if self.seccomp_filter is not None:
            files.append((self.seccomp_filter, "r"))
        return files

    def sockets(self) -> list[PurePosixPath]:
        """Unix sockets the VMM creates (API; vsock, and ``_<port>`` ones it connects to)."""
        socks = [self.api_sock]
        if self.vsock_uds is not None:
            socks.append(self.vsock_uds)
        return socks


def _resolved(path: Path) -> Path:
    try:
        return path.resolve(strict=True)
    except OSError:
        return path


def jail_facts(config: VmConfig, *, exec_file: Path | None = None) -> JailFacts:
    """Facts for ``config``; ``exec_file`` overrides ``jailer.exec_file`` (e.g. the binary
    actually installed here)."""
    jc = config.jailer_config()
    return JailFacts(
        vm_id=config.vm_id,
        jailer_binary=_resolved(jc.jailer_binary),
        exec_source=_resolved(exec_file or jc.exec_file),
        chroot_base=jc.chroot_base_dir,
        api_sock=jc.api_sock,
        kernel=KERNEL_JAIL_PATH,
        rootfs=ROOTFS_JAIL_PATH if config.rootfs_path is not None else None,
        rootfs_read_only=config.rootfs_read_only,
        networking=config.enable_networking,
        vsock_uds=config.vsock_uds_path if config.vsock_guest_cid is not None else None,
        seccomp_filter=SECCOMP_FILTER_JAIL_PATH if jc.seccomp_filter is not None else None,
        console_log=vm_run_dir(config.vm_id) / CONSOLE_LOG,
    )
