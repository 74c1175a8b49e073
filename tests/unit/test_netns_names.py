"""Pure naming helpers of ironclaw_orchestrator.vm.netns (no root, no I/O)."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import NetworkError
from ironclaw_orchestrator.vm import netns
from ironclaw_orchestrator.vm.netns import kernel, namespace

IDS = ["a", "vm-1", "VM-1", "x" * 64, "0123456789-abcdef", "-"]


@pytest.mark.parametrize("vm_id", IDS)
def test_netns_name_and_path(vm_id: str) -> None:
    name = netns.netns_name(vm_id)
    assert name == "ironclaw-" + vm_id
    assert name.startswith(netns.NETNS_PREFIX)
    assert netns.netns_path(name) == Path("/run/netns") / name


@pytest.mark.parametrize("vm_id", IDS)
def test_interface_names_fit_ifnamsiz_and_are_deterministic(vm_id: str) -> None:
    tap = netns.tap_name(vm_id)
    host_if, ns_if = netns.uplink_names(vm_id)
    for name, prefix in ((tap, "icl"), (host_if, "icv"), (ns_if, "icu")):
        assert len(name) <= 15
        assert re.fullmatch(prefix + r"[0-9a-f]{12}", name), name
    assert netns.tap_name(vm_id) == tap
    assert netns.uplink_names(vm_id) == (host_if, ns_if)


def test_interface_names_differ_between_ids() -> None:
    ids = [f"vm-{i}" for i in range(2000)]
    assert len({netns.tap_name(i) for i in ids}) == len(ids)
    assert len({netns.uplink_names(i)[0] for i in ids}) == len(ids)
    assert netns.tap_name("vm-1") != netns.tap_name("VM-1")


@pytest.mark.parametrize("vm_id", IDS)
def test_guest_mac_format_and_bits(vm_id: str) -> None:
    mac = netns.guest_mac(vm_id)
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac), mac
    assert mac.startswith("06:00:")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02, "locally administered bit must be set"
    assert not first & 0x01, "multicast bit must be clear"
    assert netns.guest_mac(vm_id) == mac


def test_guest_macs_differ_between_ids() -> None:
    ids = [f"vm-{i}" for i in range(2000)]
    assert len({netns.guest_mac(i) for i in ids}) == len(ids)


@pytest.mark.parametrize("bad", ["", "a/b", "a b", "x" * 65, "ü", "a_b", "../x"])
def test_bad_vm_ids_are_rejected(bad: str) -> None:
    for func in (netns.netns_name, netns.tap_name, netns.guest_mac, netns.uplink_names):
        with pytest.raises(NetworkError, match="invalid VM id"):
            func(bad)


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../etc", "a b"])
def test_bad_netns_names_are_rejected(bad: str) -> None:
    with pytest.raises(NetworkError, match="invalid network namespace name"):
        netns.netns_path(bad)


def test_bad_tap_name_is_rejected_before_any_io() -> None:
    with pytest.raises(NetworkError, match="invalid TAP name"):
        netns.ensure_tap("ironclaw-x", "a" * 16, 1, 1)
    with pytest.raises(NetworkError, match="invalid TAP name"):
        netns.remove_tap("ironclaw-x", "a/b")


def test_bad_uid_is_rejected() -> None:
    with pytest.raises(NetworkError, match="invalid uid"):
        netns.ensure_tap("ironclaw-x", "icl0", -1, 1)
    with pytest.raises(NetworkError, match="invalid gid"):
        netns.ensure_tap("ironclaw-x", "icl0", 1, 2**32 - 1)


def test_bad_host_cidr_is_rejected() -> None:
    with pytest.raises(NetworkError, match="invalid host_cidr"):
        netns.ensure_tap("ironclaw-x", "icl0", 1, 1, host_cidr="300.1.1.1/30")


@pytest.mark.parametrize("subnet", ["172.30.0.0/29", "172.30.0.1/30", "fd00::/126", "nonsense"])
def test_bad_uplink_subnet_is_rejected(subnet: str) -> None:
    with pytest.raises(NetworkError, match="invalid uplink subnet"):
        netns.ensure_uplink("ironclaw-x", "x", subnet)


def test_tun_ioctl_numbers_match_the_kernel_abi() -> None:
    import platform

    if platform.machine() not in ("x86_64", "aarch64", "i686", "armv7l", "s390x", "riscv64"):
        pytest.skip("constants below are for the common (non-ppc/mips) ioctl encoding")
    assert kernel._TUNSETIFF == 0x400454CA
    assert kernel._TUNSETPERSIST == 0x400454CB
    assert kernel._TUNSETOWNER == 0x400454CC
    assert kernel._TUNSETGROUP == 0x400454CE


def test_called_from_event_loop_thread_is_refused_before_any_io() -> None:
    import asyncio

    async def main() -> None:
        with pytest.raises(NetworkError, match=r"running asyncio event loop.*to_thread"):
            netns.ensure_netns("ironclaw-never-created")

    asyncio.run(main())
    assert "ironclaw-never-created" not in netns.list_netns()


def test_ifflags_ioctl_numbers_match_the_kernel_abi() -> None:
    assert kernel._SIOCGIFFLAGS == 0x8913
    assert kernel._SIOCSIFFLAGS == 0x8914
    assert kernel._IFF_UP == 1


def test_missing_lo_is_reported_as_such() -> None:
    exc = namespace._lo_error("ironclaw-x", OSError(errno.ENODEV, "No such device"))
    assert "has no 'lo' link" in str(exc) and "remove_netns()" in str(exc)
    exc = namespace._lo_error("ironclaw-x", OSError(errno.EIO, "I/O error"))
    assert "could not bring 'lo' up" in str(exc)


@pytest.mark.parametrize("err", [errno.EPERM, errno.ENOSYS])
def test_fast_path_gives_way_to_pyroute2_on_eperm_enosys(
    err: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused() -> None:
        raise OSError(err, "refused")

    monkeypatch.setattr(namespace, "_prepare_run_dir", refused)
    assert namespace._create_fast("ironclaw-x", Path("/nonexistent/ironclaw-x")) is False


def test_other_fast_path_errors_are_network_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused() -> None:
        raise OSError(errno.EROFS, "read-only file system")

    monkeypatch.setattr(namespace, "_prepare_run_dir", refused)
    with pytest.raises(NetworkError, match=r"shared mount point.*check that we run as root"):
        namespace._create_fast("ironclaw-x", Path("/nonexistent/ironclaw-x"))


def test_missing_libc_symbol_counts_as_enosys() -> None:
    with pytest.raises(OSError) as info:
        kernel._libc_call("no_such_function_in_libc_hopefully")
    assert info.value.errno == errno.ENOSYS
