"""Pure functions from configuration to command lines: jailer argv and firecracker argv.

Nothing here touches the host, so every flag is golden-tested per Firecracker and cgroup
version. Flag order follows the jailer's own documentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ConfigError
from ..lsm import AA_EXEC, RUNCON
from .binaries import Version
from .config import JailerConfig
from .seccomp import SECCOMP_FILTER_JAIL_PATH

MIN_SUPPORTED = Version(1, 0, 0)


@dataclass(frozen=True)
class CgroupArg:
    """One ``--cgroup FILE=VALUE`` for the jailer."""

    file: str
    value: str

    def render(self) -> str:
        return f"{self.file}={self.value}"


def firecracker_args(
    api_sock: PurePosixPath | Path,
    *,
    level: str | None = None,
    seccomp_filter: PurePosixPath | Path | None = None,
    no_seccomp: bool = False,
) -> list[str]:
    """Arguments for firecracker itself (after the jailer's ``--``, or when run directly).

    Seccomp flags are the same from v1.0 through v1.14: ``--seccomp-filter <file>`` and
    ``--no-seccomp`` (v0.x had ``--seccomp-level 0|1|2``, removed in v1.0; such releases are
    refused anyway).
    """
    if seccomp_filter is not None and no_seccomp:
        raise ConfigError("seccomp_filter and no_seccomp contradict each other: pick one")
    args = ["--api-sock", str(api_sock)]
    if level is not None:
        args += ["--level", level]
    if seccomp_filter is not None:
        args += ["--seccomp-filter", str(seccomp_filter)]
    if no_seccomp:
        args.append("--no-seccomp")
    return args


def lsm_exec_prefix(cfg: JailerConfig) -> list[str]:
    """The exec-transition wrapper that starts the jailer under an AppArmor profile or an
    SELinux context (the VMM inherits it, or transitions as the policy says)."""
    if cfg.apparmor_profile is not None and cfg.selinux_label is not None:
        raise ConfigError("apparmor_profile and selinux_label cannot both be set: pick one LSM")
    if cfg.apparmor_profile is not None:
        return [str(AA_EXEC), "-p", cfg.apparmor_profile, "--"]
    if cfg.selinux_label is not None:
        return [str(RUNCON), cfg.selinux_label]
    return []


def build_jailer_argv(
    cfg: JailerConfig,
    *,
    jailer: Path,
    exec_file: Path,
    version: Version,
    cgroup_version: int,
    cgroups: Sequence[CgroupArg],
    parent_cgroup: str | None,
    netns: str | None,
    level: str | None = None,
) -> list[str]:
    """The jailer command line for ``cfg``.

    ``--id`` is never repeated after ``--`` (the jailer passes it on itself) and the removed
    ``--node`` flag is never used. ``--daemonize`` is never used: the VMM stays our child.
    Every flag used here exists unchanged from v1.0 through v1.14; older jailers lack
    ``--cgroup-version`` and ``--parent-cgroup`` and are refused. ``cfg.seccomp_filter`` /
    ``no_seccomp`` become firecracker's seccomp flags (the filter at its jail path), and
    ``apparmor_profile`` / ``selinux_label`` put ``aa-exec`` / ``runcon`` in front.
    """
    if version < MIN_SUPPORTED:
        raise ConfigError(
            f"jailer {version} is older than {MIN_SUPPORTED}, the oldest release supported: "
            "install a current release with `ironclaw install`"
        )
    argv = [
        *lsm_exec_prefix(cfg),
        str(jailer),
        "--id", cfg.jailer_id,
        "--exec-file", str(exec_file),
        "--uid", str(cfg.uid),
        "--gid", str(cfg.gid),
        "--chroot-base-dir", str(cfg.chroot_base_dir),
    ]  # fmt: skip
    if netns is not None:
        argv += ["--netns", netns]
    if cfg.new_pid_ns:
        argv.append("--new-pid-ns")
    if cgroups:
        argv += ["--cgroup-version", str(cgroup_version)]
        if parent_cgroup is not None:
            argv += ["--parent-cgroup", parent_cgroup]
        for arg in cgroups:
            argv += ["--cgroup", arg.render()]
    if cfg.no_file is not None:
        argv += ["--resource-limit", f"no-file={cfg.no_file}"]
    if cfg.fsize is not None:
        argv += ["--resource-limit", f"fsize={cfg.fsize}"]
    argv.append("--")
    argv += firecracker_args(
        cfg.api_sock,
        level=level,
        seccomp_filter=SECCOMP_FILTER_JAIL_PATH if cfg.seccomp_filter is not None else None,
        no_seccomp=cfg.no_seccomp,
    )
    return argv
