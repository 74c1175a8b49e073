"""What a test may leave behind on the host: used by integration fixtures to prove cleanup."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def leftovers(
    vm_id_fragment: str = "", chroot_bases: tuple[Path, ...] = (Path("/var/jail"),)
) -> list[str]:
    """Every VM resource on this host whose name contains ``vm_id_fragment``."""
    found: list[str] = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = os.path.basename(cmd[0].decode(errors="replace")) if cmd and cmd[0] else ""
        if name.startswith(("firecracker", "jailer")) and vm_id_fragment.encode() in b" ".join(cmd):
            state = stat[stat.rfind(")") + 2]
            found.append(f"process {pid} ({name}, state {state})")
    for base in chroot_bases:
        if base.is_dir():
            for exec_dir in base.iterdir():
                for jail in exec_dir.iterdir() if exec_dir.is_dir() else ():
                    if vm_id_fragment in jail.name:
                        found.append(f"jail dir {jail}")
    run = Path(os.environ.get("IRONCLAW_RUN_DIR") or "/run/ironclaw") / "vms"
    if run.is_dir():
        found += [f"run dir {p}" for p in run.iterdir() if vm_id_fragment in p.name]
    for dirpath, dirnames, _ in os.walk(CGROUP_ROOT):
        depth = Path(dirpath).relative_to(CGROUP_ROOT).parts
        if len(depth) > 6:
            dirnames.clear()
            continue
        for d in dirnames:
            if "ironclaw" in d and vm_id_fragment in str(Path(dirpath, d)):
                found.append(f"cgroup {Path(dirpath, d)}")
    registry = Path(os.environ.get("IRONCLAW_STATE_DIR") or "/run/ironclaw/registry")
    if registry.is_dir():
        found += [
            f"registry record {p}"
            for p in registry.glob("*.json")
            if vm_id_fragment and vm_id_fragment in p.name
        ]
    netns = Path("/run/netns")
    if netns.is_dir():
        found += [
            f"netns {p.name}"
            for p in netns.iterdir()
            if p.name.startswith("ironclaw-") and vm_id_fragment in p.name
        ]
    return found
