"""Network isolation with the real jailer: private netns, tap on request, vsock."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator.errors import CgroupError, NetworkError
from ironclaw_orchestrator.vm import JailerConfig, VmConfig, start_firecracker
from ironclaw_orchestrator.vm import netns as ns
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path
from ironclaw_orchestrator.vm.vsock import connect_vsock

pytestmark = pytest.mark.integration


def cfg(vm_id: str, **kw: object) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(probe_kernel_path(ProbeBehaviour.HALT)),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        require_sandbox=True,
        **kw,  # type: ignore[arg-type]
    )


def host_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


async def test_private_netns_without_networking(vm_id: str, chroot_base: Path) -> None:
    """A VM without networking gets a namespace of its own that has no name (nothing under
    /run/netns): only ``lo`` inside, down, as the kernel made it."""
    vm = await start_firecracker(cfg(vm_id))
    name = ns.netns_name(vm_id)
    try:
        path = f"/proc/{vm.pid}/ns/net"
        assert vm.vmm.netns_path == path  # type: ignore[union-attr]
        assert os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino
        assert name not in await asyncio.to_thread(ns.list_netns)
        links = json.loads(
            subprocess.run(
                ["nsenter", f"--net={path}", "ip", "-j", "link"],
                check=True, capture_output=True, text=True,
            ).stdout
        )  # fmt: skip
        assert [(link["ifname"], "UP" in link["flags"]) for link in links] == [("lo", False)]
    finally:
        await vm.stop()
    assert vm.vmm.netns_path is None  # type: ignore[union-attr]
    assert name not in await asyncio.to_thread(ns.list_netns)


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    """``ip -j`` inside ``netns``: the kernel's view, not ours."""
    out = subprocess.run(
        ["ip", "-n", netns, "-j", *args], check=True, capture_output=True, text=True
    ).stdout
    result: list[dict[str, Any]] = json.loads(out)
    return result


async def test_networking_tap_only_inside_and_removed(vm_id: str, chroot_base: Path) -> None:
    before = host_links()
    vm = await start_firecracker(cfg(vm_id, enable_networking=True, tap_host_cidr="10.254.3.1/29"))
    name = ns.netns_name(vm_id)
    tap = ns.tap_name(vm_id)
    try:
        assert tap in await asyncio.to_thread(ns.interfaces_in, name)
        assert tap not in host_links()
        # The tap holds the host end of the guest's subnet, is up, and belongs to the jail user.
        (link,) = ip_json(name, "-d", "addr", "show", "dev", tap)
        v4 = [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"]
        assert v4 == [("10.254.3.1", 29)]
        assert "UP" in link["flags"]
        tun = link["linkinfo"]["info_data"]
        assert tun["type"] == "tap"
        uid = vm.vmm.config.uid  # type: ignore[union-attr]
        assert str(tun["user"]) in (str(uid), pwd_name(uid))
        # Firecracker was given exactly that tap, the derived MAC, and the guest's address.
        await vm.start_instance()
        info = await vm.api.request("GET", "/vm/config")
        assert isinstance(info, dict), info
        ifaces = [
            (i["iface_id"], i["host_dev_name"], i["guest_mac"]) for i in info["network-interfaces"]
        ]
        assert ifaces == [("eth0", tap, ns.guest_mac(vm_id))]
        boot_args = info["boot-source"]["boot_args"].split()
        assert "ip=10.254.3.2::10.254.3.1:255.255.255.248::eth0:off" in boot_args
        assert set(PROBE_BOOT_ARGS.split()) <= set(boot_args)
    finally:
        await vm.stop()
    assert name not in await asyncio.to_thread(ns.list_netns)
    assert host_links() == before


def pwd_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


async def test_failed_start_removes_netns_and_tap(vm_id: str, chroot_base: Path) -> None:
    bad = cfg(vm_id, enable_networking=True, jailer=JailerConfig(cpuset_cpus="999"))
    with pytest.raises(CgroupError):
        await start_firecracker(bad)
    assert ns.netns_name(vm_id) not in await asyncio.to_thread(ns.list_netns)


async def test_user_netns_is_used_and_kept(vm_id: str, chroot_base: Path) -> None:
    name = f"ironclaw-user-{vm_id}"
    path = await asyncio.to_thread(ns.ensure_netns, name)
    try:
        vm = await start_firecracker(cfg(vm_id, jailer=JailerConfig(netns=str(path))))
        try:
            assert os.stat(f"/proc/{vm.pid}/ns/net").st_ino == ns.netns_inode(path)
        finally:
            await vm.stop()
        assert path.exists()
    finally:
        await asyncio.to_thread(ns.remove_netns, name)


async def test_vsock_socket_in_jail_and_clear_error(vm_id: str, chroot_base: Path) -> None:
    vm = await start_firecracker(cfg(vm_id, vsock_guest_cid=3))
    try:
        await vm.start_instance()
        uds = vm.vmm.jail_host_path("/run/vsock.sock")  # type: ignore[union-attr]
        for _ in range(400):
            if uds.exists():
                break
            await asyncio.sleep(0.005)
        assert uds.is_socket()
        with pytest.raises(NetworkError, match="port 52"):
            await connect_vsock(uds, 52, timeout_s=2)
    finally:
        await vm.stop()
