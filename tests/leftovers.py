"""What a test may leave behind on the host: used by integration fixtures to prove cleanup.

Layout-independent: the jail and process names come from the firecracker binary this host
resolves (``firecracker -> firecracker-vX`` gives ``firecracker-vX``), through the same
function the orchestrator uses; VMMs are also found by their root inside a chroot base.
"""

from __future__ import annotations

import os
from pathlib import Path

from ironclaw_orchestrator import names, procfs
from ironclaw_orchestrator.paths import default_run_dir, default_state_dir

CGROUP_ROOT = Path("/sys/fs/cgroup")


def vmm_exec_names() -> set[str]:
    """Names a VMM of this host may carry: the resolved exec file's, plus ``firecracker``."""
    found = {"firecracker"}
    try:
        from ironclaw_orchestrator.vm.binaries import find_firecracker

        found.add(names.exec_file_name(find_firecracker()))
    except Exception:  # no binary here: nothing of ours can be running either
        pass
    return found


def _jails(fragment: str, chroot_bases: tuple[Path, ...]) -> list[Path]:
    return [
        jail
        for base in chroot_bases
        if base.is_dir()
        for exec_dir in base.iterdir()
        if exec_dir.is_dir()
        for jail in exec_dir.iterdir()
        if fragment in jail.name
    ]


def _processes(fragment: str, chroot_bases: tuple[Path, ...]) -> list[str]:
    """VMMs and jailers of ours by name and argv, plus anything rooted in a matching jail
    (compared by inode: a jailed VMM's root link reads '/' in its own mount namespace)."""
    wanted = {names.process_name(n) for n in vmm_exec_names()} | {"jailer"}
    pids = {p for jail in _jails(fragment, chroot_bases) for p in procfs.pids_using_dir(jail)}
    found = []
    for pid in procfs.all_pids():
        st = procfs.read_stat(pid)
        if st is None or pid == os.getpid():
            continue
        cmd = procfs.read_cmdline(pid)
        name = os.path.basename(cmd[0]) if cmd else st.comm
        ours = st.comm in wanted or any(name.startswith(w) for w in wanted)
        if (ours and fragment in " ".join(cmd)) or pid in pids:
            found.append(f"process {pid} ({st.comm}, state {st.state})")
    return found


def leftovers(
    vm_id_fragment: str = "", chroot_bases: tuple[Path, ...] = (Path("/var/jail"),)
) -> list[str]:
    """Every VM resource on this host whose name contains ``vm_id_fragment``."""
    found = _processes(vm_id_fragment, chroot_bases)
    found += [f"jail dir {jail}" for jail in _jails(vm_id_fragment, chroot_bases)]
    run = default_run_dir(create=False) / "vms"
    if run.is_dir():
        found += [f"run dir {p}" for p in run.iterdir() if vm_id_fragment in p.name]
    for dirpath, dirnames, _ in os.walk(CGROUP_ROOT):
        depth = Path(dirpath).relative_to(CGROUP_ROOT).parts
        if len(depth) > 6:
            dirnames.clear()
            continue
        for d in dirnames:
            if names.PARENT_CGROUP_NAME in d and vm_id_fragment in str(Path(dirpath, d)):
                found.append(f"cgroup {Path(dirpath, d)}")
    registry = default_state_dir(create=False)
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
            if names.id_from_netns(p.name) is not None and vm_id_fragment in p.name
        ]
    return found
