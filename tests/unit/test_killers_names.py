"""names.py: exact names, messages and edges (pinned where mutants of names.py survived)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ironclaw_orchestrator import names
from ironclaw_orchestrator.errors import ConfigError, NetworkError, RegistryError


def test_check_id_message_names_what_and_the_rule() -> None:
    with pytest.raises(ConfigError) as info:
        names.check_id("a b", "jailer_id")
    assert str(info.value) == (
        "jailer_id 'a b' is invalid: use 1 to 64 characters from A-Z, a-z, 0-9 and '-'"
    )
    with pytest.raises(ConfigError, match=r"^vm_id '' is invalid: "):
        names.check_id("")


def test_check_id_raises_the_requested_error_type() -> None:
    with pytest.raises(RegistryError, match=r"^id 'a/b' is invalid"):
        names.check_id("a/b", "id", RegistryError)


@pytest.mark.parametrize(
    ("vm_id", "tap", "mac", "uplink"),
    [
        ("vm-1", "icl9333f1ba2e7e", "06:00:a8:8f:a7:f2", ("icvbab81cb8857d", "icubab81cb8857d")),
        ("a", "icl6257ff3f9e43", "06:00:89:23:1d:b5", ("icvd834e466f0fc", "icud834e466f0fc")),
    ],
)
def test_network_names_are_stable(vm_id: str, tap: str, mac: str, uplink: tuple[str, str]) -> None:
    """gc finds a crashed VM's devices by these names, so they may never change."""
    assert names.tap_name(vm_id) == tap
    assert names.guest_mac(vm_id) == mac
    assert names.uplink_names(vm_id) == uplink


def test_network_names_fit_ifnamsiz_for_the_longest_id() -> None:
    vm_id = "X" * names.ID_MAX_LENGTH
    host, peer = names.uplink_names(vm_id)
    for ifname in (names.tap_name(vm_id), host, peer):
        assert len(ifname) == 15  # IFNAMSIZ - 1
    assert host[3:] == peer[3:] and host != peer
    mac = names.guest_mac(vm_id)
    first = int(mac.split(":")[0], 16)
    assert first & 0b10 and not first & 0b01  # locally administered, unicast
    assert len(mac.split(":")) == 6


def test_network_names_reject_bad_ids_with_network_error() -> None:
    for derive in (names.netns_name, names.tap_name, names.guest_mac, names.uplink_names):
        with pytest.raises(NetworkError) as info:
            derive("bad id")
        assert str(info.value) == (
            "invalid VM id 'bad id' for network naming: use 1 to 64 characters from A-Z, "
            "a-z, 0-9 and '-'"
        )


def test_id_from_netns_edges() -> None:
    assert names.id_from_netns("ironclaw-") is None
    assert names.id_from_netns("ironclaw-x") == "x"
    assert names.id_from_netns("ironclaw-" + "y" * 64) == "y" * 64
    assert names.id_from_netns("ironclaw-" + "y" * 65) is None
    assert names.id_from_netns("xironclaw-a") is None


def test_vm_cgroup_path_edges() -> None:
    assert names.vm_cgroup_path("", "vm-1") == "vm-1"
    assert names.vm_cgroup_path("/", "vm-1") == "vm-1"
    assert names.vm_cgroup_path("", "Xen") == "Xen"  # only slashes are stripped
    assert names.vm_cgroup_path("/XY/", "vm-1") == "XY/vm-1"
    assert names.vm_cgroup_path("ironclaw", "vm-1") == "ironclaw/vm-1"
    assert names.vm_cgroup_path("/user.slice/ironclaw", "vm-1") == "user.slice/ironclaw/vm-1"
    with pytest.raises(ConfigError, match=r"^vm_id '\.\.' is invalid"):
        names.vm_cgroup_path("ironclaw", "..")


def test_jail_paths(tmp_path: Path) -> None:
    jail = names.jail_dir(tmp_path, "firecracker-v1.14.1", "vm-2")
    assert jail == tmp_path / "firecracker-v1.14.1" / "vm-2"
    assert names.chroot_dir(jail) == jail / "root"
    assert names.pid_file(jail) == jail / "root" / "firecracker-v1.14.1.pid"
    with pytest.raises(ConfigError, match=r"^vm_id 'a/b' is invalid"):
        names.jail_dir(tmp_path, "firecracker", "a/b")
    with pytest.raises(ConfigError, match=r"^vm_id 'x y' is invalid"):
        names.vm_run_dir(tmp_path, "x y")


def test_process_name_cuts_at_15_bytes_never_inside_a_character() -> None:
    assert names.process_name("firecracker") == "firecracker"
    assert names.process_name("a" * 15) == "a" * 15
    assert names.process_name("a" * 16) == "a" * 15
    # 'é' is 2 bytes: a cut through it drops the half character instead of failing.
    assert names.process_name("a" * 14 + "é") == "a" * 14
    assert names.process_name("é" * 8) == "é" * 7
