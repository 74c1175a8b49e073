"""What the guest kernel is booted with, seen from inside a real jailed VM.

The CMDLINE probe prints the command line it finds through boot_params at entry, so these
tests check the whole path: ``VmConfig.boot_args`` and the ``ip=`` guest address the
orchestrator derives from ``tap_host_cidr``, through ``PUT /boot-source`` and the jailer, to
the guest's memory.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm import VmConfig, start_firecracker
from ironclaw_orchestrator.vm import netns as ns
from ironclaw_orchestrator.vm.cmdline import kernel_params
from ironclaw_orchestrator.vm.probe import (
    PROBE_BOOT_ARGS,
    READY_LINE,
    ProbeBehaviour,
    parse_cmdline,
    probe_kernel_path,
)

pytestmark = pytest.mark.integration


async def _booted_cmdline(cfg: VmConfig) -> str:
    """Start ``cfg`` jailed, boot the CMDLINE probe, return the line it printed."""
    vm = await start_firecracker(cfg)
    try:
        assert vm.is_sandboxed, "the VM ran unjailed"
        if cfg.enable_networking:
            ifaces = await asyncio.to_thread(ns.interfaces_in, ns.netns_name(cfg.vm_id))
            assert ns.tap_name(cfg.vm_id) in ifaces
        await vm.start_instance()
        assert await vm.wait() == 0  # the probe resets once it has printed its line
        console = vm.console_path.read_text(errors="replace")
    finally:
        await vm.stop()
    assert READY_LINE in console, console
    line = parse_cmdline(console)
    assert line is not None, f"no command line on the console:\n{console}"
    return line


def _probe_vm(vm_id: str, **kw: object) -> VmConfig:
    base: dict[str, object] = {
        "vm_id": vm_id,
        "kernel_path": str(probe_kernel_path(ProbeBehaviour.CMDLINE)),
        "rootfs_path": None,
        "memory_mb": 128,
        "require_sandbox": True,
    }
    return VmConfig(**{**base, **kw})  # type: ignore[arg-type]


async def test_boot_args_and_derived_guest_address_reach_the_guest(
    vm_id: str, chroot_base: Path
) -> None:
    custom = f'{PROBE_BOOT_ARGS} ironclaw.probe={vm_id} quiet msg="two words"'
    cfg = _probe_vm(vm_id, boot_args=custom, enable_networking=True, tap_host_cidr="10.213.7.1/29")
    line = await _booted_cmdline(cfg)

    seen = [(p.name, p.value) for p in kernel_params(line)]
    wanted = [(p.name, p.value) for p in kernel_params(custom)]
    assert seen[: len(wanted)] == wanted, line  # every boot arg, verbatim and in order
    ips = [value for name, value in seen if name == "ip"]
    # The next address after the tap's, the tap as gateway, the /29's mask, on eth0.
    assert ips == ["10.213.7.2::10.213.7.1:255.255.255.248::eth0:off"], line


async def test_guest_keeps_its_own_ip_argument(vm_id: str, chroot_base: Path) -> None:
    own = "ip=10.213.8.6::10.213.8.5:255.255.255.252::eth0:off"
    cfg = _probe_vm(
        vm_id, boot_args=f"{PROBE_BOOT_ARGS} {own}", enable_networking=True,
        tap_host_cidr="10.213.8.1/30",
    )  # fmt: skip
    line = await _booted_cmdline(cfg)
    assert [p.value for p in kernel_params(line) if p.name == "ip"] == [own[3:]], line


async def test_no_guest_address_without_networking(vm_id: str, chroot_base: Path) -> None:
    custom = f"{PROBE_BOOT_ARGS} ironclaw.nonet=1"
    line = await _booted_cmdline(_probe_vm(vm_id, boot_args=custom))
    assert line.startswith(custom), line
    assert "ip" not in [p.name for p in kernel_params(line)], line


async def test_longest_accepted_boot_args_leave_room_for_firecrackers_device_arguments(
    vm_id: str, chroot_base: Path, tmp_path: Path
) -> None:
    """Firecracker appends ``virtio_mmio.device=...`` per device after our line; a Linux guest
    reads 2047 bytes of it. At the longest boot_args validation accepts, with a root drive, a
    network interface and vsock, the line the guest really gets still fits."""
    rootfs = tmp_path / "rootfs.img"
    rootfs.write_bytes(bytes(1 << 20))
    kw: dict[str, object] = {
        "rootfs_path": str(rootfs), "enable_networking": True, "vsock_guest_cid": 3,
    }  # fmt: skip
    longest = 2047
    while True:  # the validator is the judge; step down until it accepts
        try:
            cfg = _probe_vm(vm_id, boot_args=f"{PROBE_BOOT_ARGS} " + "x" * longest, **kw)
            break
        except ConfigError:
            longest -= 1
    with pytest.raises(ConfigError, match="2047"):
        _probe_vm(vm_id, boot_args=f"{PROBE_BOOT_ARGS} " + "x" * (longest + 1), **kw)

    line = await _booted_cmdline(cfg)
    devices = [p for p in kernel_params(line) if p.name == "virtio_mmio.device"]
    assert len(devices) == 3, line  # block, net, vsock
    assert line.startswith(cfg.kernel_cmdline()), line
    assert len(line) <= 2047, f"{len(line)} bytes: a Linux guest would cut off {line[2047:]!r}"
