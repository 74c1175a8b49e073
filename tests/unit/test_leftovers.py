"""The leftover checker (tests/leftovers.py) reports each kind of leak we can make.

Each test plants one leak and asserts it is reported under the planted id, and not under
another id. Where planting for real is cheap and safe (a process, a cgroup directory, a
netns, a veth, a TAP, a bind mount, a socket: each with a unique name, removed afterwards)
it is real, as root; otherwise (and on hosts where that is impossible) on a temp tree
through the checker's injectable roots.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from leftovers import cgroup_mounts, leftovers

from ironclaw_orchestrator import names

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="planting this for real needs root")


@pytest.fixture
def vm_id() -> str:
    return f"lo-{secrets.token_hex(5)}"


@pytest.fixture
def other_id() -> str:
    return f"lo-{secrets.token_hex(5)}"


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, killed and reaped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def only(found: list[str], kind: str | tuple[str, ...]) -> list[str]:
    return [f for f in found if f.startswith(kind)]


# --------------------------------------------------------------------------- processes


def test_vmm_by_resolved_exec_name(
    tmp_path: Path, vm_id: str, other_id: str, spawn: list[subprocess.Popen[bytes]]
) -> None:
    """comm is the exec file's name truncated to 15 bytes (``firecracker-v1.``)."""
    exec_name = "firecracker-v1.0.0"
    (tmp_path / vm_id).mkdir()
    link = tmp_path / vm_id / exec_name
    link.symlink_to(shutil.which("sleep") or "/bin/sleep")
    spawn.append(subprocess.Popen([str(link), "600"]))
    found = only(leftovers(vm_id), "process")
    assert len(found) == 1 and f"({names.process_name(exec_name)}," in found[0], found
    assert "by name" in found[0]
    assert not only(leftovers(other_id), "process")


def test_jailer_by_name(
    tmp_path: Path, vm_id: str, other_id: str, spawn: list[subprocess.Popen[bytes]]
) -> None:
    (tmp_path / vm_id).mkdir()
    link = tmp_path / vm_id / "jailer"
    link.symlink_to(shutil.which("sleep") or "/bin/sleep")
    spawn.append(subprocess.Popen([str(link), "600"]))
    found = only(leftovers(vm_id), "process")
    assert len(found) == 1 and "(jailer," in found[0], found
    assert not only(leftovers(other_id), "process")


def test_supervisor_and_agents_by_argv(
    tmp_path: Path, vm_id: str, other_id: str, spawn: list[subprocess.Popen[bytes]]
) -> None:
    """``python -m ironclaw_orchestrator.<module>`` and the console scripts."""
    idle = "import time; time.sleep(600)"
    state = str(tmp_path / "state")
    spawn.append(  # a detached VM's supervisor: its argv names the state dir and the id
        subprocess.Popen([sys.executable, "-c", idle, "ironclaw_orchestrator.supervisor", vm_id])
    )
    spawn.append(  # a host agent started through its console script
        subprocess.Popen(
            [f"{sys.prefix}/bin/ironclaw", "-c", idle, "serve", "--socket", f"/tmp/{vm_id}/s"],
            executable=sys.executable,
        )
    )
    spawn.append(subprocess.Popen([sys.executable, "-c", idle, state, vm_id]))  # not ours
    found = only(leftovers(vm_id), "process")
    assert {int(f.split()[1]) for f in found} == {spawn[0].pid, spawn[1].pid}, found
    assert not only(leftovers(other_id), "process")


def test_process_named_by_pid(other_id: str, spawn: list[subprocess.Popen[bytes]]) -> None:
    spawn.append(subprocess.Popen(["sleep", "600"]))
    assert not only(leftovers(other_id), "process")
    found = only(leftovers(other_id, pids=[spawn[0].pid]), "process")
    assert len(found) == 1 and "named by the test" in found[0]


def test_process_rooted_in_jail_whatever_its_name(
    tmp_path: Path, vm_id: str, spawn: list[subprocess.Popen[bytes]]
) -> None:
    jail = tmp_path / "jail" / "firecracker-v9" / vm_id
    (jail / "root").mkdir(parents=True)
    spawn.append(subprocess.Popen(["sleep", "600"], cwd=jail / "root"))
    found = leftovers(vm_id, chroot_bases=[tmp_path / "jail"])
    assert f"jail dir {jail}" in found
    assert any(f"process {spawn[0].pid} " in f and "rooted in a jail" in f for f in found)


@root_only
def test_process_in_a_vm_cgroup_whatever_its_name(
    vm_id: str, spawn: list[subprocess.Popen[bytes]]
) -> None:
    with planted_cgroup("pids", vm_id) as cg:
        spawn.append(subprocess.Popen(["sleep", "600"]))
        (cg / "cgroup.procs").write_text(str(spawn[0].pid))
        found = leftovers(vm_id)
        assert f"cgroup {cg}" in found
        assert any(f"process {spawn[0].pid} " in f and "in a VM cgroup" in f for f in found)
        spawn[0].kill()
        spawn[0].wait()


# --------------------------------------------------------------- jails, run dirs, registry


def test_jail_dirs_under_every_exec_name_and_claims(
    tmp_path: Path, vm_id: str, other_id: str
) -> None:
    base = tmp_path / "jail"
    made = [
        base / "firecracker-v1.0.0" / vm_id,
        base / "firecracker-v1.14.1" / vm_id,
        base / "firecracker" / f".claim-{vm_id}-0a1b2c",
    ]
    for d in made:
        d.mkdir(parents=True)
    (base / "firecracker" / other_id).mkdir()
    found = only(leftovers(vm_id, chroot_bases=[base]), "jail dir")
    assert sorted(found) == sorted(f"jail dir {d}" for d in made)
    assert only(leftovers(vm_id), "jail dir") == []  # not in the default base


def test_run_dirs(tmp_path: Path, vm_id: str, other_id: str) -> None:
    (tmp_path / names.VMS_DIR / vm_id).mkdir(parents=True)
    assert only(leftovers(vm_id, run_roots=[tmp_path]), "run dir") == [
        f"run dir {tmp_path / names.VMS_DIR / vm_id}"
    ]
    assert only(leftovers(other_id, run_roots=[tmp_path]), "run dir") == []


def test_registry_records_and_their_jail_outside_the_given_bases(
    tmp_path: Path, vm_id: str, other_id: str
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    jail = tmp_path / "elsewhere" / "firecracker-v1.0.0" / vm_id
    jail.mkdir(parents=True)
    (state / f"{vm_id}.json").write_text(f'{{"vm_id": "{vm_id}", "jail_dir": "{jail}"}}')
    (state / f".{vm_id}.json.0a1b2c.tmp").write_text("{")
    (state / f"{vm_id}.log").write_text("x")
    (state / ".config-0a1b2c3d.json").write_text(f'{{"vm_id": "{vm_id}"}}')
    (state / ".config-1a1b2c3d.json").write_text(f'{{"vm_id": "{other_id}"}}')
    (state / ".lock").write_text("")
    found = leftovers(vm_id, state_dirs=[state])
    records = {Path(f.split(" ", 2)[2]).name for f in only(found, "registry record")}
    assert records == {
        f"{vm_id}.json",
        f".{vm_id}.json.0a1b2c.tmp",
        f"{vm_id}.log",
        ".config-0a1b2c3d.json",
    }
    assert f"jail dir {jail}" in found  # the record's chroot base is searched too
    assert only(leftovers(other_id, state_dirs=[state]), "registry record") == [
        f"registry record {state / '.config-1a1b2c3d.json'}"
    ]


# --------------------------------------------------------------------------- cgroups


@contextlib.contextmanager
def planted_cgroup(controller: str, vm_id: str) -> Iterator[Path]:
    """``<mount>/<unique>/a/ironclaw/<id>``: deeper than any fixed depth, removed after."""
    mounts = [m for m in cgroup_mounts() if m.name == controller or controller == "unified"]
    if controller == "unified":
        mounts = [m for m in cgroup_mounts() if (m / "cgroup.controllers").exists()]
    if not mounts:
        pytest.skip(f"no {controller} cgroup hierarchy mounted here")
    top = mounts[0] / f"leftovers-test-{secrets.token_hex(4)}"
    leaf = top / "a" / names.PARENT_CGROUP_NAME / vm_id
    leaf.mkdir(parents=True)
    try:
        yield leaf
    finally:
        for d in (leaf, leaf.parent, leaf.parent.parent, top):
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()


@root_only
@pytest.mark.parametrize("controller", ["memory", "cpu", "unified"])
def test_real_cgroup_at_any_depth(controller: str, vm_id: str, other_id: str) -> None:
    """The bug this checker fixes: ``…/ironclaw/<id>`` (the name is the id alone)."""
    with planted_cgroup(controller, vm_id) as leaf:
        assert only(leftovers(vm_id), "cgroup") == [f"cgroup {leaf}"]
        assert only(leftovers(other_id), "cgroup") == []
    assert only(leftovers(vm_id), "cgroup") == []


def test_cgroups_on_a_fake_tree_every_hierarchy(tmp_path: Path, vm_id: str) -> None:
    mounts = [tmp_path / "cpu", tmp_path / "systemd", tmp_path / "unified"]
    deep = [m / "x" / "y" / "z" / names.PARENT_CGROUP_NAME / vm_id for m in mounts]
    for d in deep:
        (d / "sub").mkdir(parents=True)
    found = only(leftovers(vm_id, cgroup_mounts=mounts), "cgroup")
    assert sorted(found) == sorted(f"cgroup {d}" for d in deep)
    # Without a fragment: everything beneath an ``ironclaw`` parent, not the parent itself.
    everything = only(leftovers("", cgroup_mounts=mounts), "cgroup")
    assert sorted(everything) == sorted(f"cgroup {p}" for d in deep for p in (d, d / "sub"))


def test_cgroup_mounts_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "42 31 0:39 / /a\\040b rw - cgroup2 cgroup2 rw\n"
    )
    assert cgroup_mounts(info) == tuple(
        Path(p)
        for p in (
            "/sys/fs/cgroup/cpu,cpuacct",
            "/sys/fs/cgroup/systemd",
            "/sys/fs/cgroup/unified",
            "/a b",
        )
    )


# --------------------------------------------------------------------------- network


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


net_root_only = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="planting a netns or link for real needs root and iproute2",
)


@net_root_only
def test_real_netns(vm_id: str, other_id: str) -> None:
    name = names.netns_name(vm_id)
    ip("netns", "add", name)
    try:
        found = only(leftovers(vm_id), "netns")
        assert found == [f"netns /run/netns/{name}"]
        assert only(leftovers(other_id), "netns") == []
    finally:
        ip("netns", "delete", name)
    assert only(leftovers(vm_id), "netns") == []


@net_root_only
def test_real_netns_bind_mount_elsewhere(tmp_path: Path, vm_id: str) -> None:
    target = tmp_path / vm_id / "net"
    target.parent.mkdir()
    target.touch()
    subprocess.run(["mount", "--bind", "/proc/self/ns/net", str(target)], check=True)
    try:
        assert only(leftovers(vm_id), "netns") == [f"netns bind mount {target}"]
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_stale_netns_file_on_a_fake_dir(tmp_path: Path, vm_id: str, other_id: str) -> None:
    (tmp_path / names.netns_name(vm_id)).touch()  # a crash left the file, not the mount
    (tmp_path / "someone-elses").touch()
    assert only(leftovers(vm_id, netns_dir=tmp_path), "netns") == [
        f"netns {tmp_path / names.netns_name(vm_id)}"
    ]
    assert only(leftovers("", netns_dir=tmp_path), "netns") == [
        f"netns {tmp_path / names.netns_name(vm_id)}"
    ]
    assert only(leftovers(other_id, netns_dir=tmp_path), "netns") == []


@net_root_only
def test_real_veth_and_tap_in_the_host_netns(vm_id: str, other_id: str) -> None:
    host, peer = names.uplink_names(vm_id)
    tap = names.tap_name(vm_id)
    ip("link", "add", host, "type", "veth", "peer", "name", peer)
    try:
        ip("tuntap", "add", "dev", tap, "mode", "tap")
        try:
            found = only(leftovers(vm_id), ("tap", "veth"))
            assert sorted(found) == sorted(
                [
                    f"tap {tap} (of {vm_id})",
                    f"veth {host} (of {vm_id})",
                    f"veth peer {peer} (of {vm_id})",
                ]
            )
            assert only(leftovers(other_id), ("tap", "veth")) == []
        finally:
            ip("link", "delete", tap)
    finally:
        ip("link", "delete", host)


def test_links_of_ids_met_elsewhere_on_a_fake_tree(tmp_path: Path, vm_id: str) -> None:
    """The fragment is a prefix (``<id>-a``): the ids come from the other resources found
    (here a run dir) or from ``vm_ids``."""
    child = f"{vm_id}-a"
    net = tmp_path / "net"
    net.mkdir()
    (net / names.tap_name(child)).mkdir()
    (net / "eth0").mkdir()
    assert only(leftovers(vm_id, sys_net=net), "tap") == []  # nothing names the child
    (tmp_path / names.VMS_DIR / child).mkdir(parents=True)
    found = leftovers(vm_id, sys_net=net, run_roots=[tmp_path])
    assert f"tap {names.tap_name(child)} (of {child})" in found
    assert only(leftovers(vm_id, sys_net=net, vm_ids=[child]), "tap") == [
        f"tap {names.tap_name(child)} (of {child})"
    ]
    assert only(leftovers("", sys_net=net), "link") == [f"link {names.tap_name(child)}"]


# --------------------------------------------------------------------------- sockets


def test_bound_socket_even_after_its_file_is_gone(tmp_path: Path, vm_id: str) -> None:
    path = tmp_path / f"{vm_id}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        sock.listen()
        path.unlink()
        assert only(leftovers(vm_id), "socket") == [f"socket {path}"]
    assert only(leftovers(vm_id), "socket") == []


def test_nothing_of_an_unused_id(vm_id: str) -> None:
    assert leftovers(vm_id) == []


def test_parent_chains_of_exited_makers_only(tmp_path: Path, vm_id: str) -> None:
    """A chain listed in the cgroup ledger is a leftover once its maker has exited (or when
    no maker is recorded); a live process's chain is kept by design; a gone one is no finding."""
    from ironclaw_orchestrator.vm.cgroups import ledger

    lock = tmp_path / "cgroup.lock"
    live, dead, ownerless = (tmp_path / "cg" / n for n in ("live", "dead", "ownerless"))
    for d in (live, dead, ownerless):
        d.mkdir(parents=True)
    ledger._write(
        ledger.ledger_path(lock),
        {
            str(live): ledger.this_process(),
            str(dead): "999999999:1",
            str(ownerless): None,
            str(tmp_path / "cg" / "gone"): "999999999:1",
        },
    )
    found = only(leftovers(vm_id, cgroup_lock_paths=[lock]), "parent cgroup chain")
    assert found == [
        f"parent cgroup chain {dead} (made by 999999999:1, which has exited)",
        f"parent cgroup chain {ownerless} (no maker recorded)",
    ]
