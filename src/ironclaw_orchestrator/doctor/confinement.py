"""Doctor checks for confinement beyond the jailer: seccomp filter support and active LSMs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lsm import detect_lsms
from ..vm.seccomp import kernel_supports_filter
from .report import Check, Status

if TYPE_CHECKING:
    from .checks import HostPaths


def check_confinement(host: HostPaths) -> list[Check]:
    """Seccomp filter support (Firecracker filters every thread) and the active LSMs."""
    ok, actions = kernel_supports_filter(host.proc / "sys/kernel/seccomp/actions_avail")
    checks = [
        Check("seccomp", Status.PASS, f"filter mode available ({actions})")
        if ok
        else Check("seccomp", Status.FAIL, actions,
                   "use a kernel with CONFIG_SECCOMP_FILTER: Firecracker filters its threads")
    ]  # fmt: skip
    state = detect_lsms(host.lsm)
    details: dict[str, object] = {"apparmor": state.apparmor, "selinux": state.selinux}
    if state.apparmor or state.selinux:
        checks.append(Check("LSM", Status.PASS, f"active: {state.summary()}", details=details))
    else:
        checks.append(Check("LSM", Status.WARN, f"{state.summary()}: apparmor_profile / "
                            "selinux_label are refused here",
                            "only needed for LSM confinement: boot with apparmor=1 "
                            "security=apparmor, or enable SELinux",
                            details))  # fmt: skip
    return checks
