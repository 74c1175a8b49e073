"""Which Linux Security Modules are active here, and refusing a VM that asks for one that is
not. All reading of the LSM state lives here (paths injectable for tests).

* AppArmor is active when ``/sys/module/apparmor/parameters/enabled`` is ``Y`` (and, when
  securityfs is mounted, ``apparmor`` is in ``/sys/kernel/security/lsm``).
* SELinux is active when selinuxfs is mounted (``/sys/fs/selinux/enforce`` exists); its
  value says enforcing (1) or permissive (0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import SandboxRequiredError


class LsmRequest(Protocol):
    """What :func:`require_lsm` reads (a ``JailerConfig`` has it)."""

    @property
    def jailer_id(self) -> str: ...
    @property
    def apparmor_profile(self) -> str | None: ...
    @property
    def selinux_label(self) -> str | None: ...


#: Tools that set the label the jailer is exec'd with (the exec transition): AppArmor's
#: ``aa-exec`` (package apparmor) and coreutils' ``runcon`` for SELinux.
AA_EXEC = Path("/usr/bin/aa-exec")
RUNCON = Path("/usr/bin/runcon")


@dataclass(frozen=True)
class LsmPaths:
    lsm_list: Path = Path("/sys/kernel/security/lsm")
    apparmor_enabled: Path = Path("/sys/module/apparmor/parameters/enabled")
    apparmor_profiles: Path = Path("/sys/kernel/security/apparmor/profiles")
    selinux_enforce: Path = Path("/sys/fs/selinux/enforce")
    aa_exec: Path = AA_EXEC
    runcon: Path = RUNCON


@dataclass(frozen=True)
class LsmState:
    """What this host enforces."""

    #: ``/sys/kernel/security/lsm`` (``None``: securityfs not mounted).
    stack: tuple[str, ...] | None
    apparmor: bool
    selinux: bool
    #: ``True`` enforcing, ``False`` permissive, ``None`` SELinux not active.
    selinux_enforcing: bool | None

    def summary(self) -> str:
        active = []
        if self.apparmor:
            active.append("apparmor")
        if self.selinux:
            mode = "enforcing" if self.selinux_enforcing else "permissive"
            active.append(f"selinux ({mode})")
        text = ", ".join(active) or "neither AppArmor nor SELinux"
        if self.stack is not None:
            text += f"; LSM stack: {','.join(self.stack) or '(empty)'}"
        return text


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def detect_lsms(paths: LsmPaths | None = None) -> LsmState:
    paths = paths or LsmPaths()
    raw = _read(paths.lsm_list)
    stack = tuple(p for p in raw.split(",") if p) if raw is not None else None
    apparmor = _read(paths.apparmor_enabled) == "Y" and (stack is None or "apparmor" in stack)
    enforce = _read(paths.selinux_enforce)
    selinux = enforce is not None and (stack is None or "selinux" in stack)
    return LsmState(
        stack=stack,
        apparmor=apparmor,
        selinux=selinux,
        selinux_enforcing=(enforce == "1") if selinux else None,
    )


def require_lsm(cfg: LsmRequest, paths: LsmPaths | None = None) -> None:
    """Refuse ``apparmor_profile`` / ``selinux_label`` where that LSM cannot enforce it.

    Runs before anything is created: a profile that would silently not apply is a sandbox
    the user believes in but does not have.
    """
    if cfg.apparmor_profile is None and cfg.selinux_label is None:
        return
    paths = paths or LsmPaths()
    state = detect_lsms(paths)
    vm = cfg.jailer_id
    if cfg.apparmor_profile is not None:
        if not state.apparmor:
            raise SandboxRequiredError(
                f"VM {vm}: apparmor_profile={cfg.apparmor_profile!r} was requested, but AppArmor "
                f"is not active on this host ({state.summary()}): boot with apparmor=1 "
                "security=apparmor, or drop apparmor_profile (see `ironclaw doctor`)"
            )
        if not paths.aa_exec.exists():
            raise SandboxRequiredError(
                f"VM {vm}: {paths.aa_exec} is missing; it applies the profile at exec: "
                "install the apparmor package"
            )
        loaded = _read(paths.apparmor_profiles)
        if loaded is not None and not any(
            line.split(" (")[0] == cfg.apparmor_profile for line in loaded.splitlines()
        ):
            raise SandboxRequiredError(
                f"VM {vm}: AppArmor profile {cfg.apparmor_profile!r} is not loaded: "
                f"`ironclaw security profile --apparmor --id {vm} > p && apparmor_parser -r p`"
            )
    if cfg.selinux_label is not None:
        if not state.selinux:
            raise SandboxRequiredError(
                f"VM {vm}: selinux_label={cfg.selinux_label!r} was requested, but SELinux is "
                f"not active on this host ({state.summary()}): enable SELinux, or drop "
                "selinux_label (see `ironclaw doctor`)"
            )
        if not paths.runcon.exists():
            raise SandboxRequiredError(
                f"VM {vm}: {paths.runcon} is missing; it applies the label at exec: install "
                "coreutils"
            )
