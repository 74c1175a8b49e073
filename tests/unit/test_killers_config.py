"""vm/config.py: each validation rule's exact boundary and message, and what is derived.

Written against the mutants that survived the rest of the unit suite (scripts/mutation.py):
a rule whose message or boundary could change unnoticed is pinned here.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest
from pydantic import ValidationError

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.config import (
    DEFAULT_MEMORY_HEADROOM_MIB,
    MAX_BOOT_ARGS,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    JailerConfig,
    VmConfig,
    check_id,
    config_error,
    host_path,
)


def _error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        VmConfig(**kwargs)  # type: ignore[arg-type]
    return str(info.value)


def _jailer_error(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        JailerConfig(**kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --------------------------------------------------------------------------- guest address


@pytest.mark.parametrize(
    ("cidr", "arg"),
    [
        ("172.30.0.1/30", "ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off"),
        ("10.9.8.1/24", "ip=10.9.8.2::10.9.8.1:255.255.255.0::eth0:off"),
        ("192.168.4.5/29", "ip=192.168.4.6::192.168.4.5:255.255.255.248::eth0:off"),
    ],
)
def test_guest_ip_arg_is_the_next_address_behind_the_tap(cidr: str, arg: str) -> None:
    """The kernel's ip=<client>::<gateway>:<netmask>::<device>:<autoconf> for the guest."""
    assert VmConfig(tap_host_cidr=cidr).guest_ip_arg() == arg


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize(
    ("cidr", "range_name"),
    [
        ("127.0.0.1/30", "loopback"),
        ("224.0.0.1/30", "multicast"),
        ("240.0.0.1/30", "reserved (240.0.0.0/4)"),
        ("0.0.0.1/30", "'this network' (0.0.0.0/8)"),
    ],
)
def test_special_tap_ranges_are_named(cidr: str, range_name: str) -> None:
    text = _error(tap_host_cidr=cidr)
    assert (
        f"tap_host_cidr: tap_host_cidr {cidr!r} is in the {range_name} range: use a private "
        "range such as 10.0.0.0/8 or 172.16.0.0/12"
    ) in text


@pytest.mark.parametrize(
    ("subnet", "range_name"),
    [
        ("127.1.0.0/30", "loopback"),
        ("239.0.0.0/30", "multicast"),
        ("250.0.0.0/30", "reserved (240.0.0.0/4)"),
        ("0.1.0.0/30", "'this network' (0.0.0.0/8)"),
    ],
)
def test_special_uplink_ranges_are_named(subnet: str, range_name: str) -> None:
    assert f"uplink_subnet {subnet!r} is in the {range_name} range" in _error(uplink_subnet=subnet)


def test_private_and_public_ranges_are_accepted() -> None:
    for cidr in ("10.0.0.1/30", "172.16.0.1/12", "192.168.0.1/30", "100.64.0.1/30", "8.8.8.1/30"):
        assert VmConfig(tap_host_cidr=cidr).tap_host_cidr == cidr
    assert VmConfig(uplink_subnet="10.200.0.0/30").uplink_subnet == "10.200.0.0/30"
    # Just outside 0.0.0.0/8: an ordinary (if odd) unicast range.
    assert VmConfig(tap_host_cidr="1.0.0.1/30").tap_host_cidr == "1.0.0.1/30"


# --------------------------------------------------------------------------- paths


def test_jail_path_messages() -> None:
    assert (
        "api_sock: api_sock 'run/x.sock' must be an absolute jail-relative path without '..'"
        in _jailer_error(api_sock="run/x.sock")
    )
    assert (
        "vsock_uds_path: vsock_uds_path '/run/../x.sock' must be an absolute jail-relative path "
        "without '..'"
    ) in _error(vsock_uds_path="/run/../x.sock")
    text = _error(vsock_uds_path="/run/v\x01.sock")
    assert "vsock_uds_path '/run/v\\x01.sock' contains the control character '\\x01'" in text


def test_jail_path_length_boundary() -> None:
    fits = "/" + "a/" * ((MAX_PATH_BYTES - 3) // 2) + "ab"  # no trailing '/' to drop
    assert len(fits) == MAX_PATH_BYTES
    assert JailerConfig(api_sock=PurePosixPath(fits)).api_sock == PurePosixPath(fits)
    over = fits + "b"
    assert f"api_sock is longer than {MAX_PATH_BYTES} bytes: shorten it" in _jailer_error(
        api_sock=over
    )


def test_host_path_messages_and_boundaries(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^kernel_path is empty: give a path$"):
        host_path("", "kernel_path")
    with pytest.raises(
        ValueError, match=r"^kernel_path '/a\\tb' contains the control character '\\t': remove it$"
    ):
        host_path("/a\tb", "kernel_path")
    with pytest.raises(ValueError, match="contains the control character '\\\\x7f'"):
        host_path("/a\x7fb", "kernel_path")
    # 0x1f is a control character, 0x20 (space) and 0x7e ('~') are not.
    with pytest.raises(ValueError, match="control character '\\\\x1f'"):
        host_path("/a\x1fb", "kernel_path")
    assert host_path("/a b~", "kernel_path") == "/a b~"

    name = "n" * MAX_NAME_BYTES
    assert host_path(f"/{name}", "rootfs_path") == f"/{name}"
    with pytest.raises(
        ValueError,
        match=rf"^rootfs_path '/{name}n' has a component over {MAX_NAME_BYTES} bytes$",
    ):
        host_path(f"/{name}n", "rootfs_path")

    longest = "/" + "/".join(["d" * 200] * 25)
    longest = longest[:MAX_PATH_BYTES]
    assert host_path(longest, "kernel_path") == longest
    with pytest.raises(
        ValueError, match=rf"^kernel_path is longer than {MAX_PATH_BYTES} bytes: shorten it$"
    ):
        host_path(longest + "x", "kernel_path")
    # Bytes, not characters: a 2-byte character counts twice.
    with pytest.raises(ValueError, match="longer than"):
        host_path(longest[: MAX_PATH_BYTES - 1] + "é", "kernel_path")


def test_key_of_path_errors_is_the_field(tmp_path: Path) -> None:
    assert "  rootfs_path: rootfs_path is empty: give a path" in _error(rootfs_path="")
    assert "  kernel_path: kernel_path is empty: give a path" in _error(kernel_path="")
    assert "jailer_binary: jailer_binary is empty" in _jailer_error(jailer_binary="")
    assert "exec_file: exec_file is empty" in _jailer_error(exec_file="")


def test_image_dirs_messages() -> None:
    assert (
        "image_dirs: image_dirs is empty: list at least one directory, or leave it unset"
        in _error(image_dirs=[])
    )
    assert "image_dirs: image_dirs entry 'srv/images' must be an absolute directory" in _error(
        image_dirs=["/ok", "srv/images"]
    )
    assert "image_dirs '/srv/\\x00' contains the control character" in _error(
        image_dirs=["/srv/\x00"]
    )
    assert VmConfig(image_dirs=["/a", "/b"]).image_dirs == (Path("/a"), Path("/b"))


# --------------------------------------------------------------------------- cpu lists


def test_cpu_list_messages_and_accepted_forms() -> None:
    assert (
        "cpuset_cpus: cpuset_cpus '0-' is not a CPU/node list such as '0', '0-3' or '0,2'"
        in _jailer_error(cpuset_cpus="0-")
    )
    assert "cpuset_mems: cpuset_mems 'x' is not a CPU/node list" in _jailer_error(cpuset_mems="x")
    assert "cpuset_cpus: cpuset_cpus '0,3-1': range '3-1' runs backwards" in _jailer_error(
        cpuset_cpus="0,3-1"
    )
    # A one-CPU range (lo == hi) is fine, as the kernel accepts it.
    for good in ("2-2", "0", "0-3", "0,2", "0-1,4-7"):
        assert JailerConfig(cpuset_cpus=good).cpuset_cpus == good


# --------------------------------------------------------------------------- sandbox flag


@pytest.mark.parametrize("value", ["1", "true", "YES", " On ", "True"])
def test_require_sandbox_env_truthy(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRONCLAW_REQUIRE_SANDBOX", value)
    assert VmConfig().sandbox_required() is True
    assert VmConfig(require_sandbox=False).sandbox_required() is False


@pytest.mark.parametrize("value", ["", "0", "no", "off", "false", "2", "yes please"])
def test_require_sandbox_env_falsy(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRONCLAW_REQUIRE_SANDBOX", value)
    assert VmConfig().sandbox_required() is False
    assert VmConfig(require_sandbox=True).sandbox_required() is True


def test_require_sandbox_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IRONCLAW_REQUIRE_SANDBOX", raising=False)
    assert VmConfig().sandbox_required() is False


# --------------------------------------------------------------------------- derived jailer


def test_jailer_config_derives_each_unset_field() -> None:
    v = VmConfig(
        vm_id="job-7", vcpu_count=3, memory_mb=300, memory_headroom_mb=40, image_dirs=["/img"]
    )
    j = v.jailer_config()
    assert (j.jailer_id, j.cpu_count, j.memory_limit_mb) == ("job-7", 3, 340)
    assert j.image_dirs == (Path("/img"),)


def test_jailer_config_keeps_each_chosen_field() -> None:
    chosen = JailerConfig(jailer_id="mine", cpu_count=2, memory_limit_mb=4096, image_dirs=["/j"])
    v = VmConfig(vm_id="job-8", vcpu_count=4, memory_mb=1024, image_dirs=["/v"], jailer=chosen)
    j = v.jailer_config()
    assert (j.jailer_id, j.cpu_count, j.memory_limit_mb) == ("mine", 2, 4096)
    assert j.image_dirs == (Path("/j"),)
    # Each one alone: one chosen field does not stop the others being derived.
    only_cpu = VmConfig(vm_id="a", vcpu_count=4, jailer=JailerConfig(cpu_count=1))
    assert only_cpu.jailer_config().cpu_count == 1
    assert only_cpu.jailer_config().jailer_id == "a"
    assert only_cpu.jailer_config().memory_limit_mb == 512 + DEFAULT_MEMORY_HEADROOM_MIB
    only_id = VmConfig(vm_id="a", vcpu_count=4, jailer=JailerConfig(jailer_id="b"))
    assert only_id.jailer_config().cpu_count == 4


def test_jailer_config_without_image_dirs_anywhere() -> None:
    assert VmConfig().jailer_config().image_dirs is None
    chosen = JailerConfig(image_dirs=["/j"])
    assert VmConfig(jailer=chosen).jailer_config().image_dirs == (Path("/j"),)


# --------------------------------------------------------------------------- messages


def test_error_lists_every_bad_key_under_the_model_name() -> None:
    text = _error(vcpu_count=0, memory_mb=1, bogus=1)
    lines = text.splitlines()
    assert lines[0] == "invalid VmConfig:"
    assert "  vcpu_count: Input should be greater than or equal to 1" in lines
    assert "  memory_mb: Input should be greater than or equal to 128" in lines
    assert "  bogus: Extra inputs are not permitted" in lines
    assert len(lines) == 4


def test_error_of_a_model_rule_has_no_value_error_prefix() -> None:
    text = _error(tap_host_cidr="10.0.0.1/31")
    assert text.splitlines() == [
        "invalid VmConfig:",
        "  tap_host_cidr: tap_host_cidr '10.0.0.1/31' needs a host address in a /30 or larger",
    ]
    whole = _error(memory_mb=512, jailer=JailerConfig(memory_limit_mb=512))
    assert whole.splitlines()[1].startswith("  (top level): jailer.memory_limit_mb=512 is below")


def test_nested_errors_keep_their_messages() -> None:
    text = _error(jailer={"uid": 0, "cpuset_cpus": "3-1"})
    assert "  jailer.uid: Input should be greater than or equal to 1" in text.splitlines()
    assert "  jailer.cpuset_cpus: cpuset_cpus '3-1': range '3-1' runs backwards" in text


def test_assignment_error_names_the_model() -> None:
    j = JailerConfig()
    with pytest.raises(ConfigError) as info:
        j.cpu_count = 0
    assert str(info.value).splitlines() == [
        "invalid JailerConfig:",
        "  cpu_count: Input should be greater than or equal to 1",
    ]


# --------------------------------------------------------------------------- field rules


def test_boot_args_boundaries_and_messages() -> None:
    longest = " ~" + "a" * (MAX_BOOT_ARGS - 2)
    assert VmConfig(boot_args=longest, rootfs_path=None).boot_args == longest
    over = f"boot_args: boot_args is {MAX_BOOT_ARGS + 1} characters, over the {MAX_BOOT_ARGS} limit"
    assert over in _error(boot_args="a" * (MAX_BOOT_ARGS + 1), rootfs_path=None)
    assert (
        "boot_args: boot_args contains '\\t': the kernel command line must be printable ASCII "
        "on one line (Firecracker refuses anything else)"
    ) in _error(boot_args="console=ttyS0\tquiet")
    assert "boot_args contains 'é'" in _error(boot_args="café")
    assert "boot_args contains '\\x7f'" in _error(boot_args="a\x7f")
    assert "boot_args contains '\\x1f'" in _error(boot_args="a\x1f")


@pytest.mark.parametrize(
    ("cidr", "ok"),
    [
        ("10.0.0.1/30", True),
        ("10.0.0.2/29", True),
        ("10.0.0.0/30", False),  # network address
        ("10.0.0.3/30", False),  # broadcast address
        ("10.0.0.1/31", False),
        ("10.0.0.1/16", True),
    ],
)
def test_tap_cidr_needs_a_host_address(cidr: str, ok: bool) -> None:
    if ok:
        assert VmConfig(tap_host_cidr=cidr).tap_host_cidr == cidr
    else:
        assert (
            f"tap_host_cidr: tap_host_cidr {cidr!r} needs a host address in a /30 or larger"
            in _error(tap_host_cidr=cidr)
        )


def test_tap_cidr_must_leave_the_guest_an_address() -> None:
    assert (
        "tap_host_cidr: tap_host_cidr '10.0.0.2/30' leaves no address for the guest, which gets "
        "the next one (10.0.0.3, the broadcast address): use 10.0.0.1/30"
    ) in _error(tap_host_cidr="10.0.0.2/30")
    assert VmConfig(tap_host_cidr="10.0.0.5/29").guest_ip_arg().startswith("ip=10.0.0.6::")


def test_tap_cidr_syntax_message() -> None:
    assert "tap_host_cidr: tap_host_cidr 'fd00::1/64' is not an IPv4 address/prefix" in _error(
        tap_host_cidr="fd00::1/64"
    )


def test_uplink_subnet_messages() -> None:
    assert (
        "uplink_subnet: uplink_subnet '10.200.0.1/30' is not an IPv4 network such as 10.200.0.0/30"
    ) in _error(uplink_subnet="10.200.0.1/30")
    for prefix in (29, 31):
        subnet = f"10.200.0.0/{prefix}"
        assert f"uplink_subnet: uplink_subnet {subnet!r} must be a /30" in _error(
            uplink_subnet=subnet
        )
    assert (
        "uplink_subnet: uplink_subnet '169.254.1.0/30' is link-local (169.254.0.0/16), which "
        "hosts use for metadata services and autoconfiguration: use a private range such as 10.x"
    ) in _error(uplink_subnet="169.254.1.0/30")


def test_uplink_must_not_overlap_the_tap() -> None:
    text = _error(tap_host_cidr="10.0.0.1/24", uplink_subnet="10.0.0.8/30")
    assert (
        "  (top level): uplink_subnet 10.0.0.8/30 overlaps tap_host_cidr 10.0.0.1/24: the "
        "namespace could not route between them; pick another /30"
    ) in text
    ok = VmConfig(tap_host_cidr="10.0.0.1/30", uplink_subnet="10.0.0.4/30")
    assert ok.uplink_subnet == "10.0.0.4/30"


def test_cgroup_version_accepts_only_the_integers_1_and_2() -> None:
    assert JailerConfig(cgroup_version=1).cgroup_version == 1
    assert JailerConfig(cgroup_version=2).cgroup_version == 2
    assert JailerConfig(cgroup_version=None).cgroup_version is None
    for bad in (0, 3, True, 2.0, "2"):
        assert (
            f"cgroup_version: cgroup_version {bad!r} must be the integer 1 or 2 (or unset)"
            in _jailer_error(cgroup_version=bad)
        )


@pytest.mark.parametrize(
    ("value", "normalised"),
    [
        ("ironclaw", "ironclaw"),
        ("Xen/User.Slice", "Xen/User.Slice"),  # only slashes are stripped, case is kept
        ("/a//b/", "a/b"),
        ("user.slice/ironclaw@1:x_y-z", "user.slice/ironclaw@1:x_y-z"),
        ("p" * 255, "p" * 255),
    ],
)
def test_parent_cgroup_is_normalised(value: str, normalised: str) -> None:
    assert JailerConfig(parent_cgroup=value).parent_cgroup == normalised


@pytest.mark.parametrize(
    "bad", ["", "/", "a/../b", "./a", "a b", " ironclaw", "a/" + "p" * 256, "ü"]
)
def test_parent_cgroup_refused(bad: str) -> None:
    assert (
        f"parent_cgroup: parent_cgroup {bad!r} must be a relative path like 'ironclaw'"
        in _jailer_error(parent_cgroup=bad)
    )


def test_netns_path_rules() -> None:
    assert JailerConfig(netns="/run/netns/x").netns == "/run/netns/x"
    assert JailerConfig(netns=None).netns is None
    assert "netns: netns 'x' must be an absolute path such as /run/netns/NAME" in _jailer_error(
        netns="x"
    )
    assert "netns: netns '/run/netns/a\\nb' contains the control character" in _jailer_error(
        netns="/run/netns/a\nb"
    )


def test_memory_limit_boundary_and_message() -> None:
    ok = VmConfig(memory_mb=512, jailer=JailerConfig(memory_limit_mb=528))
    assert ok.jailer_config().memory_limit_mb == 528
    text = _error(memory_mb=512, jailer=JailerConfig(memory_limit_mb=527))
    assert (
        "  (top level): jailer.memory_limit_mb=527 is below guest memory (512 MiB) + VMM "
        "overhead (16 MiB): set it to at least 528 or leave it unset to derive it"
    ) in text
    # A derived limit is never checked against a chosen one: only a chosen limit can be low.
    assert VmConfig(memory_mb=4096, jailer=JailerConfig(cpu_count=2)).jailer_config()


@pytest.mark.parametrize(
    ("kwargs", "quota"),
    [
        ({}, 100_000),
        ({"cpu_count": 3}, 300_000),
        ({"cpu_count": 3, "cpu_limit": 0.5}, 50_000),
        ({"cpu_limit": 1.5, "cpu_period_us": 10_000}, 15_000),
        ({"cpu_limit": 0.333, "cpu_period_us": 100_000}, 33_300),
        ({"cpu_limit": 0.0125, "cpu_period_us": 100_000}, 1_250),
        ({"cpu_limit": 0.01}, 1_000),
        ({"cpu_limit": 1.0006, "cpu_period_us": 1_000}, 1_001),  # rounded, not truncated
    ],
)
def test_cpu_quota(kwargs: dict[str, object], quota: int) -> None:
    assert JailerConfig(**kwargs).cpu_quota_us == quota  # type: ignore[arg-type]


def test_cpu_quota_below_the_kernel_minimum_is_refused() -> None:
    assert (
        "  (top level): cpu_limit=0.01 with cpu_period_us=1000 is a quota of 10 us, below the "
        "kernel's minimum of 1000 us: raise cpu_period_us to at least 100000"
    ) in _jailer_error(cpu_limit=0.01, cpu_period_us=1_000)
    # 999.98 us rounds to exactly the minimum: accepted.
    assert JailerConfig(cpu_limit=0.02, cpu_period_us=49_999).cpu_quota_us == 1000


def test_absolute_paths_are_kept_verbatim() -> None:
    """No lexical clean-up: "a/link/.." is not "a" when link is a symlink."""
    assert host_path("/srv/images/../x", "kernel_path") == "/srv/images/../x"
    assert host_path("/srv//x", "kernel_path") == "/srv//x"


def test_check_id_names_vm_id_by_default() -> None:
    assert check_id("ok-1") == "ok-1"
    with pytest.raises(ValueError, match=r"^vm_id 'a b' is invalid: use 1 to 64 characters"):
        check_id("a b")


def test_config_error_defaults_to_config_and_joins_nested_locations() -> None:
    with pytest.raises(ValidationError) as info:
        VmConfig.model_validate({"image_dirs": ["/a", 5]})
    text = str(config_error(info.value))
    assert text.splitlines()[0] == "invalid config:"
    assert "  image_dirs.1: Input is not a valid path" in text


def test_boot_args_with_their_own_ip_get_no_second_one() -> None:
    cfg = VmConfig(enable_networking=True, boot_args="console=ttyS0 ip=dhcp")
    assert cfg.kernel_cmdline() == "console=ttyS0 ip=dhcp"
    plain = VmConfig(enable_networking=True, boot_args="console=ttyS0")
    assert plain.kernel_cmdline() == f"console=ttyS0 {plain.guest_ip_arg()}"


def test_unclosed_quote_message() -> None:
    assert (
        "boot_args: boot_args 'console=ttyS0 x=\"a b' has an unclosed double quote: close it"
        in _error(boot_args='console=ttyS0 x="a b')
    )


def test_command_line_budget_message_says_what_was_added() -> None:
    long = "a" * (MAX_BOOT_ARGS - 60)
    text = _error(boot_args=long, enable_networking=True)
    assert "  (top level): boot_args with the guest's ip= argument and what Firecracker " in text
    assert text.endswith("(it would lose its devices): shorten boot_args")
    text = _error(boot_args=long + " ip=dhcp", enable_networking=True)
    assert "  (top level): boot_args with what Firecracker appends (root=, one" in text
