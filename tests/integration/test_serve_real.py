"""The host agent (`ironclaw serve`) against the real jailer + firecracker: API over the Unix
socket and TCP, restart with VMs running, kill -9 mid-start, dead VMs collected on start."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from agent_harness import AgentHarness, probe_body, vm_leftovers
from jailcheck import assert_record_jailed

from ironclaw_orchestrator.registry import is_alive
from ironclaw_orchestrator.vm.process import become_subreaper

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def harness(real_host: None) -> Iterator[AgentHarness]:
    become_subreaper()  # VMMs of killed supervisors are re-parented to us and reaped by gc
    h = AgentHarness(tcp_port=free_port())
    try:
        yield h
    finally:
        left = h.teardown()
        assert not left, f"the test left resources behind: {left}"


def new_id() -> str:
    return f"sv-{uuid.uuid4().hex[:10]}"


def test_api_over_unix_socket_and_tcp_with_a_real_vm(harness: AgentHarness) -> None:
    harness.start()
    assert os.stat(harness.socket).st_mode & 0o777 == 0o600
    vm_id = new_id()
    with harness.client() as c:
        r = c.post("/v1/vms", params={"start": "true"}, json=probe_body(vm_id))
        assert r.status_code == 201, r.text
        vm = r.json()
        assert vm["status"] == "running" and vm["sandboxed"] is True and vm["detached"]
        record = harness.registry().get(vm_id)
        assert record is not None
        assert_record_jailed(record)  # the kernel agrees: uid, chroot, namespaces, cgroups
        assert [v["vm_id"] for v in c.get("/v1/vms").json()] == [vm_id]
        assert c.get(f"/v1/vms/{vm_id}").json()["vmm_pid"] == vm["vmm_pid"]
        stats = c.get(f"/v1/vms/{vm_id}/stats").json()
        assert stats["memory_current_bytes"] > 0 and stats["memory_limit_bytes"] > 128 * 2**20
        assert stats["console_dropped_bytes"] == 0  # the probe says one line
        deadline = time.monotonic() + 30
        while "IRONCLAW-PROBE-READY" not in c.get(f"/v1/vms/{vm_id}/logs").text:
            assert time.monotonic() < deadline, "the probe's console never showed up"
            time.sleep(0.1)
        host = c.get("/v1/host").json()
        assert host["committed"] == {"vcpus": 1, "memory_mb": 128}
        dup = c.post("/v1/vms", params={"start": "true"}, json=probe_body(vm_id))
        assert dup.status_code == 409 and "in use" in dup.json()["error"]["message"]

    with harness.tcp_client(token=None) as t:
        r = t.get("/v1/vms")
        assert r.status_code == 401 and "no bearer token" in r.json()["error"]["message"]
    with harness.tcp_client(token="wrong-token-wrong-token") as t:
        assert t.delete(f"/v1/vms/{vm_id}").status_code == 401
    with harness.tcp_client() as t:
        assert [v["vm_id"] for v in t.get("/v1/vms").json()] == [vm_id]
        # A followed log ends when the VM is stopped.
        result: dict[str, bytes] = {}

        def follow() -> None:
            with (
                harness.client() as c2,
                c2.stream("GET", f"/v1/vms/{vm_id}/logs", params={"follow": "true"}) as s,
            ):
                result["body"] = b"".join(s.iter_bytes())

        follower = threading.Thread(target=follow)
        follower.start()
        time.sleep(0.3)
        r = t.delete(f"/v1/vms/{vm_id}")
        assert r.status_code == 200 and r.json()["status"] == "stopped", r.text
        follower.join(30)
        assert not follower.is_alive() and b"IRONCLAW-PROBE-READY" in result["body"]
        assert t.get(f"/v1/vms/{vm_id}").status_code == 404
    assert not vm_leftovers(vm_id, harness)
    assert harness.signal(signal.SIGTERM) == 0
    assert not harness.socket.exists()


def test_restart_keeps_running_vms_and_lists_them_again(harness: AgentHarness) -> None:
    harness.start()
    ids = [new_id(), new_id()]
    with harness.client() as c:
        vms = [c.post("/v1/vms", params={"start": "true"}, json=probe_body(i)).json() for i in ids]
    assert all(v["status"] == "running" for v in vms), vms
    assert harness.signal(signal.SIGTERM) == 0  # drains, exits; VMs stay with supervisors
    records = {r.vm_id: r for r in harness.registry().list()}
    assert sorted(records) == sorted(ids)
    assert all(r.vmm_alive() and r.owner_alive() for r in records.values())

    harness.start()  # a new agent (an upgrade would look the same)
    with harness.client() as c:
        host = c.get("/v1/host").json()
        assert sorted(host["adopted"]) == sorted(ids) and host["collected"] == []
        listed = {v["vm_id"]: v for v in c.get("/v1/vms").json()}
        assert sorted(listed) == sorted(ids)
        assert all(v["status"] == "running" for v in listed.values())
        assert [listed[v["vm_id"]]["vmm_pid"] for v in vms] == [v["vmm_pid"] for v in vms]
        for vm_id in ids:
            assert c.delete(f"/v1/vms/{vm_id}").status_code == 200
    for vm_id in ids:
        assert not vm_leftovers(vm_id, harness)


def test_agent_killed_mid_start_then_nothing_is_left(harness: AgentHarness) -> None:
    harness.start()
    vm_id = new_id()
    outcome: dict[str, object] = {}

    def post() -> None:
        try:
            with harness.client() as c:
                outcome["r"] = c.post("/v1/vms", params={"start": "true"}, json=probe_body(vm_id))
        except httpx.TransportError as exc:
            outcome["error"] = exc

    poster = threading.Thread(target=post)
    poster.start()
    # Kill the agent as soon as the supervisor has the VM in hand (config file or record).
    deadline = time.monotonic() + 30
    while not any(
        p.name.startswith(".config-") or p.name == f"{vm_id}.json" for p in harness.state.iterdir()
    ):
        assert time.monotonic() < deadline, "the start never began"
        time.sleep(0.002)
    assert harness.signal(signal.SIGKILL) == -signal.SIGKILL
    poster.join(30)
    assert "error" in outcome, outcome  # the client saw the connection drop

    harness.start()  # re-adopts the VM if its supervisor carried on, or collects it
    with harness.client() as c:
        deadline = time.monotonic() + 30
        while True:
            listed = {v["vm_id"]: v["status"] for v in c.get("/v1/vms").json()}
            if listed.get(vm_id) in (None, "running"):
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.1)
        if vm_id in listed:
            assert c.delete(f"/v1/vms/{vm_id}").status_code == 200
        gc = c.post("/v1/gc").json()
        assert gc["ok"], gc
    # A config file written just before the kill, never picked up: the agent sweeps it
    # once no supervisor can still want it.
    deadline = time.monotonic() + 60
    while list(harness.state.glob(".config-*")) or list(harness.state.glob(".spawn-*")):
        assert time.monotonic() < deadline, sorted(p.name for p in harness.state.iterdir())
        time.sleep(0.5)
    assert not vm_leftovers(vm_id, harness)  # (the config file names the id: checked after)


def test_vms_whose_supervisor_died_are_collected_on_start(harness: AgentHarness) -> None:
    harness.start()
    vm_id = new_id()
    with harness.client() as c:
        vm = c.post("/v1/vms", params={"start": "true"}, json=probe_body(vm_id)).json()
    assert harness.signal(signal.SIGKILL) == -signal.SIGKILL
    [rec] = harness.registry().list()
    os.kill(rec.owner_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while is_alive(rec.owner_pid, rec.owner_start_time):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert rec.vmm_alive()

    harness.start()
    with harness.client() as c:
        host = c.get("/v1/host").json()
        assert host["collected"] == [vm_id] and host["adopted"] == []
        assert c.get("/v1/vms").json() == []
    assert not is_alive(vm["vmm_pid"], rec.vmm_start_time)
    assert not vm_leftovers(vm_id, harness)


def test_tcp_refused_without_token_file(harness: AgentHarness) -> None:
    harness.token_file.unlink()
    with pytest.raises(AssertionError, match="cannot be opened"):
        harness.start(timeout_s=30)
    assert not harness.socket.exists()


def test_sigterm_drains_a_start_in_flight_then_exits(harness: AgentHarness) -> None:
    harness.start()
    vm_id = new_id()
    outcome: dict[str, httpx.Response] = {}

    def post() -> None:
        with harness.client() as c:
            outcome["r"] = c.post("/v1/vms", params={"start": "true"}, json=probe_body(vm_id))

    poster = threading.Thread(target=post)
    poster.start()
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(".config-") for p in harness.state.iterdir()):
        assert time.monotonic() < deadline, "the start never began"
        time.sleep(0.002)
    assert harness.signal(signal.SIGTERM) == 0  # waits for the start, then exits 0
    poster.join(30)
    r = outcome["r"]
    assert r.status_code == 201 and r.json()["status"] == "running", r.text
    [rec] = harness.registry().list()
    assert rec.vm_id == vm_id and rec.vmm_alive() and rec.owner_alive()
    harness.start()
    with harness.client() as c:
        assert c.get("/v1/host").json()["adopted"] == [vm_id]
        assert c.delete(f"/v1/vms/{vm_id}").status_code == 200
    assert not vm_leftovers(vm_id, harness)


def test_hostile_requests_over_the_real_socket_leave_nothing(harness: AgentHarness) -> None:
    harness.start()
    before = sorted(p.name for p in harness.state.iterdir())
    with harness.client() as c:
        checks = [
            (c.post("/v1/vms", content=b'{"vm_id": "x",'), 400, "not valid JSON"),
            (c.post("/v1/vms", content=b"{" + b" " * 100_000 + b"}"), 413, "too large"),
            (c.post("/v1/vms", content=iter([b" " * 8192] * 20)), 413, "too large"),
            (c.post("/v1/vms", json=probe_body("a", nope=1)), 422, "nope"),
            (c.post("/v1/vms", json=probe_body("../x")), 422, "vm_id"),
            (c.post("/v1/vms", json=probe_body("a", kernel_path="/etc/shadow")), 403, "image"),
            (c.get("/v1/vms/..%2F..%2Fetc%2Fshadow"), 404, "no such resource"),
            (c.get("/v1/vms/a.b/logs"), 422, "vm_id"),
            (c.delete("/v1/vms/never-was"), 404, "no VM"),
        ]
        for r, status, needle in checks:
            assert r.status_code == status and needle in r.json()["error"]["message"], r.text
    assert sorted(p.name for p in harness.state.iterdir()) == before
    assert not any(harness.jail.iterdir())


def test_concurrent_starts_on_a_small_host_are_admitted_or_refused_at_once(
    harness: AgentHarness,
) -> None:
    harness.extra += ["--capacity-memory", "300"]  # two 128 MiB VMs fit, a third does not
    harness.start()
    ids = [new_id() for _ in range(4)]
    with harness.client() as c:  # a defined VM counts only once started
        assert c.post("/v1/vms", json=probe_body(ids[0])).json()["status"] == "defined"
    results: dict[str, httpx.Response] = {}

    def start(vm_id: str, defined: bool) -> None:
        with harness.client() as c:
            if defined:
                results[vm_id] = c.post(f"/v1/vms/{vm_id}/start")
            else:
                results[vm_id] = c.post("/v1/vms", params={"start": "true"}, json=probe_body(vm_id))

    threads = [threading.Thread(target=start, args=(i, i == ids[0])) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r.status_code for r in results.values())
    assert codes in ([200, 201, 429, 429], [201, 201, 429, 429]), {
        k: r.text for k, r in results.items()
    }
    refused = [r.json()["error"] for r in results.values() if r.status_code == 429]
    assert all(e["reason"] == "host_full" and "300 MiB" in e["message"] for e in refused)
    running = [i for i, r in results.items() if r.status_code in (200, 201)]
    with harness.client() as c:
        host = c.get("/v1/host").json()
        assert host["committed"]["memory_mb"] == 256 and host["starting"] == 0
        for vm_id in running:
            assert c.delete(f"/v1/vms/{vm_id}").status_code == 200
        if ids[0] not in running:
            assert c.delete(f"/v1/vms/{ids[0]}").json()["status"] == "deleted"
    for vm_id in ids:
        assert not vm_leftovers(vm_id, harness)


def test_exec_reaches_the_guest_agent_of_a_real_vm(harness: AgentHarness) -> None:
    """Through the agent to a jailed VM's vsock: the C test guest answers the handshake and
    refuses ``exec`` (it only speaks hello, ping and echo), and that refusal comes back."""
    from ironclaw_orchestrator.agent.guest import build_vsock_guest
    from ironclaw_orchestrator.errors import HostError

    try:
        kernel = build_vsock_guest()
    except HostError as exc:
        pytest.skip(f"cannot build the vsock test guest: {exc}")
    harness.extra += ["--image-dir", str(kernel.parent)]
    harness.start()
    vm_id = new_id()
    with harness.client() as c:
        body = probe_body(vm_id, kernel_path=str(kernel), vsock_guest_cid=3)
        r = c.post("/v1/vms", params={"start": "true"}, json=body)
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 120
        while True:
            r = c.post(f"/v1/vms/{vm_id}/exec", json={"argv": ["true"]})
            if r.status_code != 502:  # 502: the guest's agent is not listening yet
                break
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)
        err = r.json()["error"]
        assert r.status_code == 422 and err["type"] == "AgentRequestError", r.text
        assert err["reason"] == "unknown_request"
        assert c.delete(f"/v1/vms/{vm_id}").status_code == 200
    assert not vm_leftovers(vm_id, harness)
