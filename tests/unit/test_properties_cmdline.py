"""The guest kernel command line: ``boot_args`` and the guest's ``ip=`` address (vm/cmdline.py,
``VmConfig.kernel_cmdline``), and that what start-up sends to Firecracker is exactly that."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from property_strategies import ipv4_interfaces

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm import KERNEL_JAIL_PATH, FirecrackerProcess, _configure
from ironclaw_orchestrator.vm.cmdline import add_param, has_param, kernel_params
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig
from ironclaw_orchestrator.vm.pool import WarmPool

# Parameters as users write them: name[=value], value possibly quoted (with spaces inside).
_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=12).filter(
    lambda s: s != "--"
)
_plain_values = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12).map(
    lambda s: s.replace('"', "")
)
_quoted_values = st.text("abc xyz=,.", max_size=10).map(lambda s: f'"{s}"')


@st.composite
def params(draw: st.DrawFn) -> tuple[str, str | None, str]:
    """``(name, value as the kernel sees it, text as written)``."""
    name = draw(_names)
    kind = draw(st.sampled_from(["flag", "plain", "quoted"]))
    if kind == "flag":
        return name, None, name
    if kind == "plain":
        value = draw(_plain_values)
        return name, value, f"{name}={value}"
    quoted = draw(_quoted_values)
    return name, quoted[1:-1], f"{name}={quoted}"


cmdlines = st.lists(params(), max_size=8)


@given(cmdlines, st.sampled_from([" ", "  "]))
def test_kernel_params_split_as_the_kernel_does(
    ps: list[tuple[str, str | None, str]], sep: str
) -> None:
    line = sep.join(text for _, _, text in ps)
    assert [(p.name, p.value) for p in kernel_params(line)] == [(n, v) for n, v, _ in ps]


@given(cmdlines, cmdlines)
def test_params_after_a_double_dash_belong_to_init(
    kernel: list[tuple[str, str | None, str]], init: list[tuple[str, str | None, str]]
) -> None:
    line = " ".join([*(t for _, _, t in kernel), "--", *(t for _, _, t in init)])
    assert [p.name for p in kernel_params(line)] == [n for n, _, _ in kernel]


@given(cmdlines, st.one_of(st.none(), cmdlines), params())
def test_add_param_is_seen_by_the_kernel_and_keeps_everything_else(
    kernel: list[tuple[str, str | None, str]],
    init: list[tuple[str, str | None, str]] | None,
    new: tuple[str, str | None, str],
) -> None:
    words = [t for _, _, t in kernel]
    if init is not None:
        words += ["--", *(t for _, _, t in init)]
    line = " ".join(words)
    out = add_param(line, new[2])
    assert [(p.name, p.value) for p in kernel_params(out)] == [
        *((n, v) for n, v, _ in kernel),
        (new[0], new[1]),
    ]
    if init is not None:  # init's arguments are untouched, after the '--'
        assert out.endswith(" ".join(["--", *(t for _, _, t in init)]))


@pytest.mark.parametrize(
    ("cmdline", "has_ip"),
    [
        ("console=ttyS0 ip=dhcp", True),
        ('"ip=10.0.0.2::10.0.0.1:255.255.255.252::eth0:off" quiet', True),
        ("nfs.skip=1 vip=3 zip=1", False),  # 'ip=' inside another parameter's name
        ('foo="a ip=b"', False),  # inside a quoted value
        ("console=ttyS0 -- ip=1.2.3.4", False),  # init's, not the kernel's
        ("ip", True),
    ],
)
def test_has_ip_param(cmdline: str, has_ip: bool) -> None:
    assert has_param(cmdline, "ip") is has_ip


# --------------------------------------------------------------------------- guest address


def _ip_fields(cmdline: str) -> list[str]:
    ips = [p for p in kernel_params(cmdline) if p.name == "ip"]
    assert len(ips) == 1, cmdline
    assert ips[0].value is not None
    # ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>
    fields = ips[0].value.split(":")
    assert len(fields) == 7, ips[0].value
    return fields


def _usable(net: ipaddress.IPv4Network, ip: ipaddress.IPv4Address) -> bool:
    return ip in net and ip not in (net.network_address, net.broadcast_address)


@given(ipv4_interfaces(min_prefix=8, max_prefix=32))
def test_tap_cidr_accepted_iff_tap_and_guest_both_get_a_usable_address(cidr: str) -> None:
    iface = ipaddress.IPv4Interface(cidr)
    net = iface.network
    special = (
        net.is_loopback
        or net.is_multicast
        or net.is_reserved
        or net.subnet_of(ipaddress.IPv4Network("0.0.0.0/8"))
    )
    has_next = int(iface.ip) < 2**32 - 1
    ok = has_next and _usable(net, iface.ip) and _usable(net, iface.ip + 1) and not special
    if not ok:
        with pytest.raises(ConfigError, match="tap_host_cidr"):
            VmConfig(tap_host_cidr=cidr)
        return
    cfg = VmConfig(tap_host_cidr=cidr, enable_networking=True)
    client, server, gateway, netmask, hostname, device, autoconf = _ip_fields(cfg.kernel_cmdline())
    guest = ipaddress.IPv4Address(client)
    assert _usable(net, guest)
    assert guest != iface.ip
    assert guest == iface.ip + 1  # documented: the guest gets the next address
    assert ipaddress.IPv4Address(gateway) == iface.ip  # the tap is the guest's gateway
    assert ipaddress.IPv4Address(netmask) == net.netmask
    assert (server, hostname, device, autoconf) == ("", "", "eth0", "off")


def test_last_host_address_leaves_no_room_for_the_guest() -> None:
    """172.30.0.2/30 used to give the guest 172.30.0.3, the broadcast address."""
    with pytest.raises(ConfigError, match="broadcast address"):
        VmConfig(tap_host_cidr="172.30.0.2/30")
    VmConfig(tap_host_cidr="172.30.0.1/30")


def test_default_guest_address() -> None:
    cfg = VmConfig(enable_networking=True)
    assert cfg.kernel_cmdline() == (
        "console=ttyS0 reboot=k panic=1 pci=off ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off"
    )


boot_args_values = st.lists(params(), max_size=6).map(lambda ps: " ".join(t for _, _, t in ps))


@given(boot_args_values, st.booleans(), st.sampled_from(["172.30.0.1/30", "10.9.8.7/24"]))
def test_kernel_cmdline_is_boot_args_plus_one_derived_ip(
    boot_args: str, networking: bool, cidr: str
) -> None:
    cfg = VmConfig(boot_args=boot_args, enable_networking=networking, tap_host_cidr=cidr)
    line = cfg.kernel_cmdline()
    user = [(p.name, p.value) for p in kernel_params(boot_args)]
    got = [(p.name, p.value) for p in kernel_params(line)]
    if not networking or has_param(boot_args, "ip"):
        assert line == boot_args  # the user's own ip= (or no network) is left alone
        return
    assert got[: len(user)] == user  # every boot arg reaches the kernel, in order
    assert len(got) == len(user) + 1
    assert ipaddress.IPv4Address(_ip_fields(line)[0]) == ipaddress.IPv4Interface(cidr).ip + 1


@given(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=2047),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_accepted_config_has_a_command_line_that_fits(
    boot_args: str, networking: bool, rootfs: bool, vsock: bool
) -> None:
    """Whatever is accepted, the line the guest gets (with ip=, and root= and one
    virtio_mmio.device= per device as Firecracker appends them) fits the 2047 bytes a Linux
    guest reads."""
    try:
        cfg = VmConfig(
            boot_args=boot_args,
            enable_networking=networking,
            rootfs_path="/img/rootfs.ext4" if rootfs else None,
            vsock_guest_cid=3 if vsock else None,
        )
    except ConfigError as exc:
        assert "boot_args" in str(exc)
        return
    firecracker_adds = (networking + rootfs + vsock) * len(" virtio_mmio.device=4K@0xd0000000:15")
    firecracker_adds += len(" root=/dev/vda rw") if rootfs else 0
    assert len(cfg.kernel_cmdline()) + firecracker_adds <= 2047
    assert has_param(cfg.kernel_cmdline(), "ip") is (networking or has_param(boot_args, "ip"))


def test_boot_args_too_long_for_the_ip_argument() -> None:
    VmConfig(boot_args="x" * 2047, rootfs_path=None)  # fine without networking
    with pytest.raises(ConfigError, match="ip= argument"):
        VmConfig(boot_args="x" * 2000, rootfs_path=None, enable_networking=True)


# --------------------------------------------------------------------------- what start-up sends


class _RecordingApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> None:
            self.calls.append((name, args, kwargs))

        return call


def _sent(api: _RecordingApi, path: str) -> list[dict[str, Any]]:
    """The bodies sent to ``path`` (or below it) by ``_configure``'s pipelined requests."""
    return [
        body
        for name, args, _ in api.calls
        if name == "request_all"
        for method, to, body in args[0]
        if to == path or to.startswith(path + "/")
    ]


class _Vmm:
    """Stands in for an unjailed VMM: only its API client is used by ``_configure``."""

    def __init__(self) -> None:
        self.api = _RecordingApi()


@given(boot_args_values, st.booleans())
async def test_configure_sends_the_kernel_command_line(boot_args: str, networking: bool) -> None:
    cfg = VmConfig(
        vm_id="cmdline-1", kernel_path="/k/vmlinux", rootfs_path=None,
        boot_args=boot_args, enable_networking=networking, tap_host_cidr="10.1.2.1/29",
    )  # fmt: skip
    vmm = _Vmm()
    await _configure(FirecrackerProcess(cfg, vmm))  # type: ignore[arg-type]
    boots = _sent(vmm.api, "/boot-source")
    assert len(boots) == 1
    args = (Path(boots[0]["kernel_image_path"]), boots[0]["boot_args"])
    assert args[0] == Path("/k/vmlinux")
    assert args[1] == cfg.kernel_cmdline()
    sent = [(p.name, p.value) for p in kernel_params(args[1])]
    assert sent[: len(kernel_params(boot_args))] == [
        (p.name, p.value) for p in kernel_params(boot_args)
    ]
    if networking and not has_param(boot_args, "ip"):
        assert _ip_fields(args[1])[:4] == ["10.1.2.2", "", "10.1.2.1", "255.255.255.248"]
        assert len(_sent(vmm.api, "/network-interfaces")) == 1


async def test_configure_sends_custom_boot_args_verbatim() -> None:
    custom = "console=ttyS0 reboot=k panic=1 pci=off ironclaw.test=abc123 quiet"
    cfg = VmConfig(vm_id="cmdline-2", kernel_path="/k/vmlinux", rootfs_path=None, boot_args=custom)
    vmm = _Vmm()
    await _configure(FirecrackerProcess(cfg, vmm))  # type: ignore[arg-type]
    assert _sent(vmm.api, "/boot-source") == [
        {"kernel_image_path": "/k/vmlinux", "boot_args": custom}
    ]


@given(boot_args_values, boot_args_values, st.booleans())
async def test_pool_claim_sends_the_claims_command_line(
    pooled_args: str, claim_args: str, networking: bool
) -> None:
    """A warm-pool claim with other boot args re-sends the boot source (allowed until
    InstanceStart) with the claim's full command line; with the same ones, nothing."""
    common = {
        "kernel_path": "/k/vmlinux", "rootfs_path": None, "enable_networking": networking,
        "tap_host_cidr": "10.1.2.1/29",
    }  # fmt: skip
    pooled = VmConfig(vm_id="pooled-1", boot_args=pooled_args, **common)  # type: ignore[arg-type]
    claim = VmConfig(vm_id="claim-1", boot_args=claim_args, **common)  # type: ignore[arg-type]
    vmm = _Vmm()
    vmm.config = JailerConfig()  # type: ignore[attr-defined]
    await WarmPool._reconfigure(
        FirecrackerProcess(claim, vmm),  # type: ignore[arg-type]
        FirecrackerProcess(pooled, vmm),  # type: ignore[arg-type]
        vmm,  # type: ignore[arg-type]
    )
    boots = [a for name, a, _ in vmm.api.calls if name == "put_boot_source"]
    if claim.kernel_cmdline() == pooled.kernel_cmdline():
        assert boots == []
    else:
        assert boots == [(KERNEL_JAIL_PATH, claim.kernel_cmdline())]
