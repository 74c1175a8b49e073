"""A VM's own network namespace, tap and uplink through start, stop and rollback, on the
stand-in jailer with a fake network layer (making real namespaces needs root)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fake_net import FakeNet, install
from standin_host import StandinHost, make_host

from ironclaw_orchestrator import names
from ironclaw_orchestrator.errors import ConfigError, NetworkError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import start_firecracker
from ironclaw_orchestrator.vm.cgroups import release_chains


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    monkeypatch.delenv("IRONCLAW_REQUIRE_SANDBOX", raising=False)
    yield from make_host(monkeypatch, 2)


@pytest.fixture
def net(host: StandinHost, monkeypatch: pytest.MonkeyPatch) -> FakeNet:
    return install(monkeypatch, host.root / "netns")


def networked(host: StandinHost, vm_id: str = "sa-1", **kw: object) -> object:
    return host.vm_config(vm_id, enable_networking=True, jailer={"isolate_network": True}, **kw)


async def test_namespace_tap_and_uplink_made_and_removed(host: StandinHost, net: FakeNet) -> None:
    net.ensure_netns("ironclaw-neighbour")
    registry = Registry(host.root / "state")
    cfg = networked(host, uplink_subnet="10.200.0.0/30")
    vm = await start_firecracker(cfg, registry=registry)  # type: ignore[arg-type]
    name = names.netns_name("sa-1")
    try:
        assert net.devices[name] == {names.tap_name("sa-1"), "uplink-sa-1"}
        assert vm.vmm.argv[vm.vmm.argv.index("--netns") + 1] == str(net.dir / name)
        rec = registry.get("sa-1")
        assert rec is not None and rec.netns_name == name and rec.uplink
    finally:
        await vm.stop()
    assert not (net.dir / name).exists() and name not in net.devices
    assert (net.dir / "ironclaw-neighbour").exists()
    calls = {(r["method"], r["path"]): r["body"] for r in host.requests()}
    iface = calls[("PUT", "/network-interfaces/eth0")]
    assert iface["host_dev_name"] == names.tap_name("sa-1")
    assert iface["guest_mac"] == names.guest_mac("sa-1")
    # the guest's address reaches its kernel: 172.30.0.2 behind the tap's 172.30.0.1/30
    boot_args = calls[("PUT", "/boot-source")]["boot_args"]
    assert "ip=172.30.0.2::172.30.0.1:255.255.255.252::eth0:off" in boot_args


@pytest.mark.parametrize("step", ["tap", "uplink"])
async def test_network_failure_removes_the_namespace_only(
    host: StandinHost, net: FakeNet, step: str
) -> None:
    net.ensure_netns("ironclaw-neighbour")
    before = host.snapshot()
    net.fail = step
    with pytest.raises(NetworkError, match="injected"):
        await start_firecracker(networked(host, uplink_subnet="10.200.0.0/30"))  # type: ignore[arg-type]
    assert sorted(p.name for p in net.dir.iterdir()) == ["ironclaw-neighbour"]
    assert host.snapshot() == before
    assert Registry(host.root / "state").list() == []  # the claim was released


async def test_namespace_of_the_same_id_is_refused_and_kept(
    host: StandinHost, net: FakeNet
) -> None:
    taken = net.ensure_netns(names.netns_name("sa-1"))
    before = host.snapshot()
    with pytest.raises(ConfigError, match="already exists"):
        await start_firecracker(networked(host))  # type: ignore[arg-type]
    assert taken.exists() and host.snapshot() == before


async def test_namespace_is_claimed_then_recorded_then_made(
    host: StandinHost, net: FakeNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record-before-make without a lock: the name is claimed (exclusive create) before any
    record names it, and recorded before the namespace is bound on the claim."""
    from ironclaw_orchestrator.vm import netns as ns

    registry = Registry(host.root / "state")
    seen: list[tuple[str, str | None]] = []

    def spy(step: str, real: object) -> object:
        def call(name: str) -> object:
            rec = registry.get("sa-1")
            seen.append((step, rec.netns_name if rec is not None else "no record"))
            return real(name)  # type: ignore[operator]

        return call

    monkeypatch.setattr(ns, "claim_netns_name", spy("claim", net.claim_netns_name))
    monkeypatch.setattr(ns, "create_claimed_netns", spy("create", net.create_claimed_netns))
    vm = await start_firecracker(networked(host), registry=registry)  # type: ignore[arg-type]
    await vm.stop()
    name = names.netns_name("sa-1")
    assert seen == [("claim", None), ("create", name)]
    assert not (net.dir / name).exists()


async def test_a_private_namespace_adds_no_host_lock_to_a_start(
    host: StandinHost, net: FakeNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work count: the namespace's claim is an exclusive create, so a networked start takes
    exactly the host locks (flock) of a start without a namespace of its own."""
    import fcntl

    locks: list[int] = []
    real_flock = fcntl.flock

    def counting_flock(fd: int, op: int) -> None:
        if op & fcntl.LOCK_EX:
            locks.append(fd)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", counting_flock)
    counts = []
    for vm_id, cfg in (("sa-1", host.vm_config("sa-1")), ("sa-2", networked(host, "sa-2"))):
        release_chains([host.root / "cgroup.lock"])  # both start without the cgroup chain
        locks.clear()
        vm = await start_firecracker(cfg)  # type: ignore[arg-type]
        counts.append(len(locks))
        await vm.stop()
        assert not (net.dir / names.netns_name(vm_id)).exists()
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize(
    "lsm", [{"apparmor_profile": "ironclaw-sa-1"}, {"selinux_label": "system_u:system_r:vm_t:s0"}]
)
async def test_a_confined_jailer_joins_a_named_namespace(
    host: StandinHost, net: FakeNet, monkeypatch: pytest.MonkeyPatch, lsm: dict[str, str]
) -> None:
    """Under an AppArmor profile or SELinux label the jailer may not open our
    ``/proc/<pid>/fd/<fd>`` (a ptrace read of our process): its VM's namespace is named,
    recorded and removed by name; an unconfined one's has no name."""
    from ironclaw_orchestrator.vm import hardening, jailer_args

    monkeypatch.setattr(hardening, "require_lsm", lambda cfg: None)  # no LSM on this host
    monkeypatch.setattr(jailer_args, "lsm_exec_prefix", lambda cfg: [])  # nor aa-exec/runcon
    registry = Registry(host.root / "state")
    for vm_id, confined in (("sa-1", True), ("sa-2", False)):
        jailer = {"isolate_network": True, **(lsm if confined else {})}
        vm = await start_firecracker(host.vm_config(vm_id, jailer=jailer), registry=registry)
        name = names.netns_name(vm_id)
        try:
            joined = vm.vmm.argv[vm.vmm.argv.index("--netns") + 1]
            rec = registry.get(vm_id)
            assert rec is not None
            if confined:
                assert joined == str(net.dir / name) and (net.dir / name).exists()
                assert rec.netns_name == name
            else:
                assert joined.startswith(f"/proc/{os.getpid()}/fd/")
                assert rec.netns_name is None and not (net.dir / name).exists()
        finally:
            await vm.stop()
        assert not (net.dir / name).exists()


async def test_a_namespace_that_cannot_be_joined_fails_the_start_and_frees_it(
    host: StandinHost, net: FakeNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``open_netns`` fails after the nameless namespace exists: the start raises that
    NetworkError before anything is spawned, and its probe (what holds the namespace) is
    closed with everything else the start made."""
    from ironclaw_orchestrator.vm import netns as ns

    probes: list[object] = []
    real_create = net.create_vm_netns

    def create() -> object:
        probes.append(real_create())
        return probes[-1]

    def refuse(probe: object) -> int:
        raise NetworkError("could not open a VM's network namespace (SIOCGSKNS): injected")

    monkeypatch.setattr(ns, "create_vm_netns", create)
    monkeypatch.setattr(ns, "open_netns", refuse)
    before = host.snapshot()
    registry = Registry(host.root / "state")
    cfg = host.vm_config("sa-1", jailer={"isolate_network": True})
    with pytest.raises(NetworkError, match="SIOCGSKNS"):
        await start_firecracker(cfg, registry=registry)
    assert len(probes) == 1 and probes[0].fileno() == -1  # type: ignore[attr-defined]
    assert host.spawned() == [] and registry.get("sa-1") is None
    assert host.snapshot() == before
