"""Properties of the id rule and of every name derived from an id (names.py, vm/netns/names.py).

What must hold for every id, not just the few a hand-written test picks: the validators accept
exactly the documented domain; each derived name fits the kernel's limit for its kind, is
accepted by the validator of that kind, round-trips where a reverse mapping exists, and is
different for different ids.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from property_strategies import (
    ID_ALPHABET,
    ID_MAX_LENGTH,
    any_id_text,
    invalid_ids,
    is_documented_id,
    valid_ids,
)

from ironclaw_orchestrator import names
from ironclaw_orchestrator.errors import ConfigError, NetworkError
from ironclaw_orchestrator.vm.config import JailerConfig, VmConfig
from ironclaw_orchestrator.vm.netns import names as ns_names
from ironclaw_orchestrator.vm.netns.names import IFNAME_MAX

# --------------------------------------------------------------------------- the id rule


@given(any_id_text)
def test_id_validators_accept_exactly_the_documented_domain(value: str) -> None:
    expected = is_documented_id(value)
    assert names.is_valid_id(value) is expected
    if expected:
        assert names.check_id(value) == value
    else:
        with pytest.raises(ConfigError, match="vm_id"):
            names.check_id(value)


@given(any_id_text)
def test_config_ids_follow_the_same_rule(value: str) -> None:
    """``VmConfig.vm_id`` and ``JailerConfig.jailer_id`` agree with ``names.is_valid_id``."""
    if is_documented_id(value):
        assert VmConfig(vm_id=value).vm_id == value
        assert JailerConfig(jailer_id=value).jailer_id == value
        assert VmConfig(vm_id=value).jailer_config().jailer_id == value
    else:
        with pytest.raises(ConfigError, match="vm_id"):
            VmConfig(vm_id=value)
        with pytest.raises(ConfigError, match="jailer_id"):
            JailerConfig(jailer_id=value)


@given(valid_ids)
def test_a_trailing_newline_is_never_part_of_an_id(vm_id: str) -> None:
    assert not names.is_valid_id(vm_id + "\n")


@pytest.mark.parametrize(("length", "ok"), [(1, True), (64, True), (65, False)])
def test_id_length_boundary(length: int, ok: bool) -> None:
    vm_id = "a" * length
    assert names.ID_MAX_LENGTH == 64  # the documented bound (README, the facts note)
    assert names.is_valid_id(vm_id) is ok
    if ok:
        VmConfig(vm_id=vm_id)
        JailerConfig(jailer_id=vm_id)
        names.tap_name(vm_id)
        names.jail_dir(Path("/var/jail"), "firecracker", vm_id)
    else:
        with pytest.raises(ConfigError, match="1 to 64 characters"):
            VmConfig(vm_id=vm_id)
        with pytest.raises(ConfigError, match="jailer_id"):
            JailerConfig(jailer_id=vm_id)
        with pytest.raises(NetworkError):
            names.tap_name(vm_id)
        with pytest.raises(ConfigError):
            names.jail_dir(Path("/var/jail"), "firecracker", vm_id)


def test_non_ascii_alphanumerics_are_refused() -> None:
    """The jailer accepts Unicode alphanumerics; we do not (paths, cgroups, log lines)."""
    for vm_id in ("vm٣", "vmé", "\uff56\uff4d", "vm_1"):
        assert not names.is_valid_id(vm_id)


# --------------------------------------------------------------------------- network names

IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def _fits_ifnamsiz(name: str) -> bool:
    # IFNAMSIZ is 16 bytes with the NUL; '/', ':' and whitespace are refused by the kernel.
    return len(name.encode()) <= 15 and IFNAME.fullmatch(name) is not None


@given(valid_ids)
def test_interface_names_fit_ifnamsiz_and_pass_the_interface_check(vm_id: str) -> None:
    tap = names.tap_name(vm_id)
    host_if, ns_if = names.uplink_names(vm_id)
    assert IFNAME_MAX == 15
    for name in (tap, host_if, ns_if):
        assert _fits_ifnamsiz(name), name
        ns_names._check_ifname(name)  # the validator every caller of ensure_tap goes through
    assert len({tap, host_if, ns_if}) == 3


@given(st.sets(valid_ids, min_size=2, max_size=40))
def test_derived_names_differ_for_different_ids(ids: set[str]) -> None:
    """Two VMs never share a namespace, a TAP, a veth, a MAC, a jail or a cgroup."""
    derived = {
        "netns": {names.netns_name(i) for i in ids},
        "tap": {names.tap_name(i) for i in ids},
        "uplink": {names.uplink_names(i) for i in ids},
        "mac": {names.guest_mac(i) for i in ids},
        "jail": {names.jail_dir(Path("/var/jail"), "firecracker", i) for i in ids},
        "run": {names.vm_run_dir(Path("/run/ironclaw"), i) for i in ids},
        "cgroup": {names.vm_cgroup_path("ironclaw", i) for i in ids},
    }
    for kind, values in derived.items():
        assert len(values) == len(ids), kind
    # No VM's TAP is another VM's veth end.
    ifnames = [n for i in ids for n in (names.tap_name(i), *names.uplink_names(i))]
    assert len(set(ifnames)) == len(ifnames)


def test_derived_names_are_the_same_in_every_process() -> None:
    """gc and stop (other processes, other hash seeds) find the names start derived."""
    ids = ["a", "A", "0", "-", "vm-1", "x" * ID_MAX_LENGTH, "it-0123456789"]
    script = (
        "import json, sys; from ironclaw_orchestrator import names as n; "
        "print(json.dumps([[n.netns_name(i), n.tap_name(i), list(n.uplink_names(i)), "
        "n.guest_mac(i)] for i in sys.argv[1:]]))"
    )
    here = [
        [names.netns_name(i), names.tap_name(i), list(names.uplink_names(i)), names.guest_mac(i)]
        for i in ids
    ]
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script, *ids],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert json.loads(out) == here


@given(valid_ids)
def test_netns_name_round_trips_and_is_a_valid_namespace_name(vm_id: str) -> None:
    name = names.netns_name(vm_id)
    assert names.id_from_netns(name) == vm_id
    path = ns_names.netns_path(name)  # the validator of namespace names
    assert path == Path("/run/netns") / name
    assert len(name.encode()) <= 255  # NAME_MAX of the bind-mount file


@given(
    st.one_of(
        any_id_text.map(lambda s: "ironclaw-" + s),
        any_id_text.map(lambda s: "ironclaw" + s),
        st.text(max_size=80),
    )
)
def test_id_from_netns_only_claims_our_names(name: str) -> None:
    """gc must never take someone else's namespace for one of ours."""
    vm_id = names.id_from_netns(name)
    if vm_id is not None:
        assert names.netns_name(vm_id) == name
        assert names.is_valid_id(vm_id)
    else:
        assert not (name.startswith("ironclaw-") and is_documented_id(name[9:]))


@given(valid_ids)
def test_guest_mac_is_locally_administered_unicast(vm_id: str) -> None:
    mac = names.guest_mac(vm_id)
    octets = mac.split(":")
    assert len(octets) == 6 and all(re.fullmatch(r"[0-9a-f]{2}", o) for o in octets)
    first = int(octets[0], 16)
    assert first & 0x02  # locally administered: never collides with a vendor's MAC
    assert not first & 0x01  # unicast


@given(invalid_ids())
def test_network_names_refuse_invalid_ids(vm_id: str) -> None:
    for derive in (names.netns_name, names.tap_name, names.guest_mac, names.uplink_names):
        with pytest.raises(NetworkError, match="invalid VM id"):
            derive(vm_id)


@given(st.one_of(st.text(ID_ALPHABET + "_.", max_size=17), st.text(max_size=20)))
def test_ifname_check_accepts_exactly_kernel_interface_names(name: str) -> None:
    ok = _fits_ifnamsiz(name) and name not in (".", "..")
    if ok:
        ns_names._check_ifname(name)
    else:
        with pytest.raises(NetworkError, match="interface"):
            ns_names._check_ifname(name)


# --------------------------------------------------------------------------- jail, run dir, cgroup

exec_names = st.text(ID_ALPHABET + "._", min_size=1, max_size=40).filter(
    lambda s: s not in (".", "..")
)


@given(valid_ids, exec_names)
def test_jail_layout(vm_id: str, exec_name: str) -> None:
    """``<base>/<exec name>/<id>/root``, pid file ``root/<exec name>.pid``, as the jailer does."""
    base = Path("/var/jail")
    jail = names.jail_dir(base, exec_name, vm_id)
    assert jail.relative_to(base).parts == (exec_name, vm_id)
    assert names.chroot_dir(jail) == jail / "root"
    assert names.pid_file(jail) == jail / "root" / f"{exec_name}.pid"
    # JailerConfig computes the same directory (one fact, two callers).
    cfg = JailerConfig(jailer_id=vm_id, chroot_base_dir=base, exec_file=Path("/opt") / exec_name)
    assert cfg.jail_dir == jail
    assert cfg.chroot_dir == names.chroot_dir(jail)


@given(st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and "\x00" not in s))
def test_process_name_is_what_the_kernel_keeps_of_the_name(exec_name: str) -> None:
    comm = names.process_name(exec_name)
    raw = exec_name.encode()
    assert len(comm.encode()) <= 15  # TASK_COMM_LEN 16 with the NUL
    assert raw.startswith(comm.encode())
    if len(raw) <= 15:
        assert comm == exec_name
    else:
        assert len(comm.encode()) > 15 - 4  # at most a cut multi-byte character is dropped


parent_paths = st.lists(
    st.text(ID_ALPHABET + "_.:@", min_size=1, max_size=12).filter(lambda s: s not in (".", "..")),
    min_size=1,
    max_size=4,
).map(lambda parts: "/".join(parts))


@given(parent_paths, valid_ids, st.sampled_from(["", "/", "//"]), st.sampled_from(["", "/"]))
def test_vm_cgroup_path_is_parent_then_id(parent: str, vm_id: str, lead: str, trail: str) -> None:
    """Whatever slashes the parent is given with, the VM's cgroup is ``<parent>/<id>``."""
    cfg = JailerConfig(parent_cgroup=lead + parent + trail)
    assert cfg.parent_cgroup == parent  # normalised once, at validation
    path = names.vm_cgroup_path(lead + parent + trail, vm_id)
    assert path.split("/") == [*parent.split("/"), vm_id]
    assert names.vm_cgroup_path(cfg.parent_cgroup, vm_id) == path
    assert names.vm_cgroup_path("", vm_id) == vm_id


@given(st.text(max_size=30))
def test_parent_cgroup_never_escapes_the_hierarchy(value: str) -> None:
    """An accepted parent is relative, has no '.'/'..' and no empty part, and is idempotent."""
    try:
        cfg = JailerConfig(parent_cgroup=value)
    except ConfigError as exc:
        assert "parent_cgroup" in str(exc)
        return
    parent = cfg.parent_cgroup
    assert parent is not None
    parts = parent.split("/")
    assert all(p and p not in (".", "..") for p in parts)
    assert not parent.startswith("/")
    assert JailerConfig(parent_cgroup=parent).parent_cgroup == parent


@given(valid_ids)
def test_run_dir_is_under_the_run_root(vm_id: str) -> None:
    root = Path("/run/ironclaw")
    assert names.vm_run_dir(root, vm_id).relative_to(root).parts == ("vms", vm_id)


_files = st.sampled_from(["/opt/fc-a", "/opt/firecracker-v1.0.0", "/usr/bin/fc-long-name-b"])
_steps = st.lists(
    st.tuples(st.sampled_from(["read", "copy", "assign", "copy-other", "derive"]), _files),
    max_size=8,
)


@given(_files, _steps)
def test_exec_file_name_is_always_the_current_files_name(
    first: str, steps: list[tuple[str, str]]
) -> None:
    """However a config is copied, re-pointed or derived, its jail (and the socket and pid
    paths under it) are named after the exec file it now has: these files do not exist, so
    the resolved name is the basename."""
    cfg = JailerConfig(exec_file=first, jailer_id="vm1")
    for op, path in steps:
        if op == "read":
            _ = cfg.jail_dir
        elif op == "copy":
            cfg = cfg.model_copy(update={"exec_file": Path(path)})
        elif op == "copy-other":
            cfg = cfg.model_copy(update={"uid": 4242})
        elif op == "assign":
            cfg.exec_file = Path(path)
        else:
            cfg = VmConfig(vm_id="vm1", jailer=cfg).jailer_config()
        assert cfg.exec_file_name == Path(cfg.exec_file).name
        assert cfg.jail_dir == names.jail_dir(cfg.chroot_base_dir, Path(cfg.exec_file).name, "vm1")
