"""What :class:`FirecrackerProcess` adds for rate limits and confinement: live rate-limit
updates, metered vsock connections, the seccomp check, and stats that include it."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from ..errors import ConfigError, UsageError
from ..lsm import require_lsm
from .cgroups import CgroupStats
from .config import JailerConfig, VmConfig
from .jailer import JailerProcess
from .ratelimit import RateLimit
from .seccomp import SeccompStatus, check_filtered, check_no_seccomp_allowed, read_seccomp_status
from .staging import check_source
from .unjailed import UnjailedProcess
from .vsock import Handler, VsockLimiter, connect_vsock, listen_vsock

ROOTFS_DRIVE_ID = "rootfs"
NET_IFACE_ID = "eth0"


@dataclasses.dataclass(frozen=True)
class VmStats(CgroupStats):
    """Cgroup counters plus the VMM's seccomp state (weakest mode over its threads: 2 =
    every thread filtered, 0 = some thread unfiltered; ``None``: unreadable), and the bytes
    of console output dropped to keep within ``VmConfig.console_limit_bytes``."""

    seccomp_mode: int | None = None
    seccomp_threads: int | None = None
    console_dropped_bytes: int | None = None


class HardeningMixin:
    """Methods of a running VM (``FirecrackerProcess``) for rate limits and seccomp."""

    config: VmConfig
    vmm: JailerProcess | UnjailedProcess
    vsock_limiter: VsockLimiter | None

    def seccomp_status(self) -> SeccompStatus:
        """Seccomp mode of every VMM thread, read from /proc now."""
        return read_seccomp_status(self.vmm.pid)

    async def _check_seccomp(self) -> None:
        """Every VMM thread must run under a filter (vCPU threads install theirs as they
        start, so allow them a moment)."""
        status = self.seccomp_status()
        for _ in range(20):
            if status.filtered or self.vmm.returncode is not None:
                break
            await asyncio.sleep(0.05)
            status = self.seccomp_status()
        if self.vmm.returncode is None:
            check_filtered(status, self.config.vm_id)

    async def update_rate_limits(
        self,
        *,
        drive: RateLimit | None = None,
        net_rx: RateLimit | None = None,
        net_tx: RateLimit | None = None,
    ) -> None:
        """Replace rate limits on the running VM (Firecracker's PATCH endpoints).

        Each limit given replaces that device's limiter (``RateLimit()`` removes it); ``None``
        leaves it alone. Firecracker accepts these only after ``start_instance()``.
        """
        if not self.vmm.booted:
            raise UsageError(
                f"VM {self.config.vm_id}: rate limits can be changed only after start_instance() "
                "(before that, set drive_rate_limit / net_*_rate_limit in VmConfig)"
            )
        if drive is not None:
            if self.config.rootfs_path is None:
                raise UsageError(f"VM {self.config.vm_id} has no root drive to rate-limit")
            await self.vmm.api.patch_drive_rate_limit(ROOTFS_DRIVE_ID, drive)
        if net_rx is not None or net_tx is not None:
            if not self.config.enable_networking:
                raise UsageError(
                    f"VM {self.config.vm_id} has no network interface (enable_networking)"
                )
            await self.vmm.api.patch_network_rate_limits(NET_IFACE_ID, rx=net_rx, tx=net_tx)

    def vsock_uds_host_path(self) -> Path:
        """Host path of the VM's vsock socket (jailed VMs only)."""
        if self.config.vsock_guest_cid is None or not isinstance(self.vmm, JailerProcess):
            raise UsageError(f"VM {self.config.vm_id} has no vsock device (set vsock_guest_cid)")
        return self.vmm.jail_host_path(self.config.vsock_uds_path)

    async def connect_vsock(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to guest vsock ``port``, metered by ``vsock_rate_limit``."""
        return await connect_vsock(self.vsock_uds_host_path(), port, limiter=self.vsock_limiter)

    async def listen_vsock(self, port: int, handler: Handler) -> asyncio.Server:
        """Accept guest connections to host ``port``, metered by ``vsock_rate_limit``."""
        assert isinstance(self.vmm, JailerProcess)  # vsock_uds_host_path() checked
        path = self.vsock_uds_host_path()
        cfg = self.vmm.config
        return await listen_vsock(
            path, port, handler, uid=cfg.uid, gid=cfg.gid, limiter=self.vsock_limiter
        )


def check_confinement(config: VmConfig, jailer_cfg: JailerConfig, *, jailed: bool) -> None:
    """Rate-limit, seccomp and LSM options, checked before anything is recorded or made.

    Rate limits need their device; ``no_seccomp`` is refused in production mode; a custom
    filter must be a readable file inside ``image_dirs``; LSM and filter options are applied
    by the jailer, and an LSM must be active here.
    """
    vm = config.vm_id
    if config.drive_rate_limit is not None and config.rootfs_path is None:
        raise ConfigError(f"VM {vm}: drive_rate_limit needs a root drive (rootfs_path)")
    if (config.net_rx_rate_limit or config.net_tx_rate_limit) and not config.enable_networking:
        raise ConfigError(f"VM {vm}: net_rx/tx_rate_limit need enable_networking")
    check_no_seccomp_allowed(jailer_cfg.no_seccomp, config.sandbox_required(), vm)
    if jailer_cfg.seccomp_filter is not None:
        check_source(jailer_cfg.seccomp_filter, "jailer.seccomp_filter", jailer_cfg.image_dirs)
    wanted = [
        key
        for key in ("apparmor_profile", "selinux_label", "seccomp_filter")
        if getattr(jailer_cfg, key) is not None
    ]
    if wanted and not jailed:
        raise ConfigError(
            f"VM {vm}: jailer.{wanted[0]} is applied by the jailer, but this VM would "
            "run unjailed (development mode): run as root with the jailer installed, or drop it"
        )
    if jailed:
        require_lsm(jailer_cfg)
