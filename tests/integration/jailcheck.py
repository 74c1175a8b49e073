"""Is a running VMM really jailed? Read from the kernel (``/proc``), not from our own objects.

A launch test that only checks that a guest booted also passes on the unjailed fallback, or
with a jailer run that lost a step (no uid drop, no chroot, no PID namespace, no cgroups).
:func:`assert_jailed` fails then, naming what is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

from ironclaw_orchestrator import names
from ironclaw_orchestrator.registry import VmRecord
from ironclaw_orchestrator.vm import FirecrackerProcess


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _ns(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def cgroup_of(pid: int, controller: str) -> str:
    """The v1 cgroup path of ``pid`` in ``controller``'s hierarchy."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    raise AssertionError(f"pid {pid} is in no {controller} cgroup")


def assert_jailed(vm: FirecrackerProcess, chroot_base: Path = Path("/var/jail")) -> None:
    """The VMM runs as the VM's own unprivileged uid/gid, chrooted into its jail, in new PID,
    mount and network namespaces, inside the VM's memory and cpu cgroups. (Seccomp is
    firecracker's own, installed per thread as it boots: see test_hardening_real.)"""
    assert vm.is_sandboxed, "the VMM was started without the jailer (unjailed fallback)"
    config = vm.vmm.config  # type: ignore[union-attr]
    argv = vm.vmm.argv  # type: ignore[union-attr]
    exec_name = names.exec_file_name(argv[argv.index("--exec-file") + 1])
    vm_id = vm.config.vm_id
    assert_process_jailed(
        vm.pid,
        vm_id=vm_id,
        jail=names.jail_dir(chroot_base, exec_name, vm_id),
        uid=config.uid,
        gid=config.gid,
        new_pid_ns=config.new_pid_ns,
    )


def assert_record_jailed(record: VmRecord) -> None:
    """:func:`assert_process_jailed` for a VM started elsewhere (CLI, supervisor, agent),
    from its registry record."""
    assert record.sandboxed, f"VM {record.vm_id} runs unjailed: {record}"
    assert record.vmm_pid is not None and record.jail_dir is not None, record
    assert record.uid is not None and record.gid is not None, record
    assert record.jail_dir.name == record.vm_id, record
    assert_process_jailed(
        record.vmm_pid, vm_id=record.vm_id, jail=record.jail_dir, uid=record.uid, gid=record.gid
    )


def assert_process_jailed(
    pid: int, *, vm_id: str, jail: Path, uid: int, gid: int, new_pid_ns: bool = True
) -> None:
    status = proc_status(pid)
    assert uid != 0 and gid != 0
    assert status["Uid"].split() == [str(uid)] * 4, f"VMM uids {status['Uid']}, want {uid}"
    assert status["Gid"].split() == [str(gid)] * 4, f"VMM gids {status['Gid']}, want {gid}"
    assert status["Groups"] == "", f"VMM keeps supplementary groups {status['Groups']}"
    # Its / is the jail's root/ (compared by inode: inside its mount namespace it reads '/').
    chroot = names.chroot_dir(jail)
    root, want = os.stat(f"/proc/{pid}/root/"), os.stat(chroot)
    assert (root.st_dev, root.st_ino) == (want.st_dev, want.st_ino), f"VMM root is not {chroot}"
    assert status["Name"] == names.process_name(jail.parent.name)
    # Namespaces of its own.
    for kind in ("mnt", "net"):
        assert _ns(pid, kind) != _ns("self", kind), f"VMM shares our {kind} namespace"
    if new_pid_ns:
        assert _ns(pid, "pid") != _ns("self", "pid"), "VMM shares our PID namespace"
        assert status["NSpid"].split()[-1] == "1", f"VMM is not PID 1 of its namespace: {status}"
    # The VM's cgroups, beneath ours: ``…/ironclaw/<id>`` in every controller it is limited by.
    for controller in ("memory", "cpu"):
        path = cgroup_of(pid, controller)
        assert path.endswith(f"/{names.PARENT_CGROUP_NAME}/{vm_id}"), (controller, path)
