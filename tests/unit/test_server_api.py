"""Host agent API without VMs: validation, policy, admission, auth, body limits, sockets.

The agent runs on the stand-in host (``standin_host.make_refusal_host``): should a refusal
below break, its supervisor starts the VM on the stand-ins, and the test names what was made.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from standin_host import StandinHost, make_refusal_host

from ironclaw_orchestrator.errors import ConfigError, UsageError
from ironclaw_orchestrator.server import AgentSettings, HostAgent, create_app
from ironclaw_orchestrator.server.runner import bind_unix, serve
from ironclaw_orchestrator.server.settings import read_token

TOKEN = b"s3cret-token-0123456789abcdef"


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    yield from make_refusal_host(monkeypatch)


@pytest.fixture
def settings(tmp_path: Path, standin: StandinHost) -> AgentSettings:
    images = tmp_path / "images"
    images.mkdir()
    (images / "vmlinux").write_bytes(b"\x7fELF")
    return AgentSettings(
        socket_path=tmp_path / "agent.sock",
        state_dir=standin.state,
        run_dir=standin.run,
        chroot_base=standin.base,
        image_dirs=(images,),
        capacity_vcpus=2,
        capacity_memory_mb=1024,
        cpu_overcommit=2.0,
        max_starting=2,
        labels={"zone": "a"},
    )


@pytest.fixture
async def agent(settings: AgentSettings) -> HostAgent:
    agent = HostAgent(settings)
    await agent.startup()
    return agent


def _as_unix(app: Any, path: str) -> Any:
    """What uvicorn passes for a Unix-socket connection: ``server == (path, None)``."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "server": (path, None)}
        await app(scope, receive, send)

    return wrapped


@pytest.fixture
async def client(agent: HostAgent) -> AsyncIterator[httpx.AsyncClient]:
    app = _as_unix(create_app(agent, token=None), str(agent.settings.socket_path))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://agent"
    ) as c:
        yield c


def kernel(settings: AgentSettings) -> str:
    return str(settings.image_dirs[0] / "vmlinux")


def vm_body(settings: AgentSettings, **extra: Any) -> dict[str, Any]:
    return {"kernel_path": kernel(settings), "rootfs_path": None, "memory_mb": 128, **extra}


def state_files(settings: AgentSettings) -> list[str]:
    return sorted(str(p.relative_to(settings.state_dir)) for p in settings.state_dir.rglob("*"))


# --------------------------------------------------------------------------- resources


async def test_host_reports_capacity_committed_health_labels(
    client: httpx.AsyncClient, agent: HostAgent
) -> None:
    agent.registry.claim("other-1", vcpus=1, memory_mb=256)  # a VM of ours, counted
    r = await client.get("/v1/host")
    assert r.status_code == 200
    host = r.json()
    assert host["capacity"]["admit_vcpus"] == 4 and host["capacity"]["admit_memory_mb"] == 1024
    assert host["committed"] == {"vcpus": 1, "memory_mb": 256}
    assert host["labels"] == {"zone": "a"} and host["draining"] is False
    assert host["version"] and host["vms"] == 1
    agent.registry.release("other-1")


async def test_openapi_documents_v1_and_the_vmconfig_body(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    for path in ("/v1/vms", "/v1/vms/{vm_id}", "/v1/vms/{vm_id}/logs", "/v1/host"):
        assert path in doc["paths"]
    body = doc["paths"]["/v1/vms"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/VmConfig"}
    schemas = doc["components"]["schemas"]
    assert "memory_mb" in schemas["VmConfig"]["properties"] and "JailerConfig" in schemas
    get_host = doc["paths"]["/v1/host"]["get"]["responses"]
    assert get_host["200"]["content"]["application/json"]["schema"]["$ref"].endswith("HostInfo")
    assert get_host["429"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorBody")


async def test_define_list_get_delete_without_starting(
    client: httpx.AsyncClient, settings: AgentSettings
) -> None:
    r = await client.post("/v1/vms", json=vm_body(settings, vm_id="def-1", vcpu_count=2))
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "defined"
    assert [v["vm_id"] for v in (await client.get("/v1/vms")).json()] == ["def-1"]
    assert (await client.get("/v1/vms/def-1")).json()["vcpus"] == 2
    again = await client.post("/v1/vms", json=vm_body(settings, vm_id="def-1"))
    assert again.status_code == 409 and "in use" in again.json()["error"]["message"]
    assert (await client.delete("/v1/vms/def-1")).json()["status"] == "deleted"
    assert (await client.get("/v1/vms/def-1")).status_code == 404
    # A restarted agent sees definitions: they live on disk, not in memory.


async def test_missing_vm_id_gets_a_fresh_one(
    client: httpx.AsyncClient, settings: AgentSettings
) -> None:
    r = await client.post("/v1/vms", json=vm_body(settings))
    assert r.status_code == 201
    vm_id = r.json()["vm_id"]
    assert vm_id.startswith("vm-")
    await client.delete(f"/v1/vms/{vm_id}")


async def test_logs_stream_and_follow_until_the_vm_is_gone(
    client: httpx.AsyncClient, agent: HostAgent, tmp_path: Path
) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"line 1\n")
    agent.registry.claim("logged", console_path=console)
    assert (await client.get("/v1/vms/logged/logs")).text == "line 1\n"

    async def later() -> None:
        await asyncio.sleep(0.3)
        with console.open("ab") as f:
            f.write(b"line 2\n")
        await asyncio.sleep(0.3)
        agent.registry.release("logged")

    task = asyncio.ensure_future(later())
    async with client.stream("GET", "/v1/vms/logged/logs", params={"follow": "true"}) as r:
        body = b"".join([chunk async for chunk in r.aiter_bytes()])
    await task
    assert body == b"line 1\nline 2\n"


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        (b"", 400, "body is empty"),
        (b'{"vm_id": ', 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 422, "must be a JSON object"),
        (b'{"vm_id": "a", "bogus": 1}', 422, "bogus: Extra inputs are not permitted"),
        (b'{"vm_id": "../../etc"}', 422, "vm_id '../../etc' is invalid"),
        (b'{"memory_mb": 1}', 422, "memory_mb"),
        (b'{"jailer": {"jailer_binary": "/bin/sh"}}', 403, "jailer.jailer_binary is set by"),
        (b'{"jailer": {"chroot_base_dir": "/"}}', 403, "jailer.chroot_base_dir"),
        (b'{"uplink_subnet": "10.9.0.0/30"}', 403, "uplink_subnet is set by"),
        (b'{"kernel_path": "/etc/shadow"}', 403, "not in an image directory"),
        (b'{"kernel_path": "vmlinux"}', 403, "not in an image directory"),
        (b'{"image_dirs": ["/"]}', 403, "image_dirs is set by"),
        (b'{"jailer": {"image_dirs": ["/"]}}', 403, "jailer.image_dirs"),
        (b'{"require_sandbox": false}', 403, "jailed VMs only"),
    ],
)
async def test_hostile_bodies_get_4xx_and_leave_nothing(
    client: httpx.AsyncClient,
    settings: AgentSettings,
    standin: StandinHost,
    content: bytes,
    status: int,
    needle: str,
) -> None:
    before, made = state_files(settings), standin.made()  # the agent's own state dirs
    r = await client.post("/v1/vms", content=content, params={"start": "true"})
    assert standin.made() == made, r.text
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["status"] == status
    assert state_files(settings) == before


async def test_symlink_out_of_the_image_dir_is_refused(
    client: httpx.AsyncClient, settings: AgentSettings
) -> None:
    link = settings.image_dirs[0] / "sneaky"
    link.symlink_to("/etc/passwd")
    r = await client.post("/v1/vms", json=vm_body(settings, kernel_path=str(link)))
    assert r.status_code == 403 and "not in an image directory" in r.text


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/vms/..%2F..%2Fetc%2Fpasswd", 404),
        ("/v1/vms/a.b", 422),
        ("/v1/vms/" + "a" * 65, 422),
        ("/v1/vms/%00", 422),
        ("/v2/vms", 404),
    ],
)
async def test_path_tricks_in_ids(client: httpx.AsyncClient, path: str, status: int) -> None:
    r = await client.get(path)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


async def test_bad_query_value_is_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/vms", params={"start": "maybe"}, json={})
    assert r.status_code == 422 and "start" in r.json()["error"]["message"]


async def test_huge_bodies_are_refused_declared_or_streamed(
    client: httpx.AsyncClient, settings: AgentSettings
) -> None:
    big = b"{" + b" " * (settings.max_body_bytes + 10) + b"}"
    r = await client.post("/v1/vms", content=big)
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 4096

    r = await client.post("/v1/vms", content=chunks())
    assert r.status_code == 413
    assert state_files(settings) == ["defined"]


# --------------------------------------------------------------------------- admission


async def test_full_host_refuses_with_429_and_reason(
    client: httpx.AsyncClient, agent: HostAgent, settings: AgentSettings, standin: StandinHost
) -> None:
    made = standin.made()
    agent.registry.claim("big", vcpus=1, memory_mb=1000)
    r = await client.post("/v1/vms", params={"start": "true"}, json=vm_body(settings))
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["reason"] == "host_full" and "1000 of 1024 MiB" in err["message"]
    agent.registry.release("big")
    agent.registry.claim("cpus", vcpus=4, memory_mb=128)
    r = await client.post("/v1/vms", params={"start": "true"}, json=vm_body(settings))
    assert r.status_code == 429 and "vCPU" in r.json()["error"]["message"]
    agent.registry.release("cpus")
    assert not agent.admission.starting
    assert standin.made() == made


async def test_starting_cap_and_draining(
    client: httpx.AsyncClient, agent: HostAgent, settings: AgentSettings, standin: StandinHost
) -> None:
    from ironclaw_orchestrator.server.admission import Usage

    made = standin.made()

    agent.admission.starting.update({"s1": Usage(1, 128), "s2": Usage(1, 128)})
    r = await client.post("/v1/vms", params={"start": "true"}, json=vm_body(settings))
    assert r.status_code == 429 and r.json()["error"]["reason"] == "too_many_starting"
    assert r.headers["retry-after"] == "1"
    agent.admission.starting.clear()
    drain = asyncio.ensure_future(agent.drain(5.0))
    await drain
    r = await client.post("/v1/vms", params={"start": "true"}, json=vm_body(settings))
    assert r.status_code == 503 and r.json()["error"]["reason"] == "draining"
    assert (await client.get("/v1/host")).json()["health"] == "draining"
    assert standin.made() == made


# --------------------------------------------------------------------------- TCP and token


@pytest.fixture
def tcp_app(agent: HostAgent) -> Any:
    return create_app(agent, token=TOKEN)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": TOKEN.decode()}, 401),
        ({"Authorization": f"Bearer {TOKEN.decode()}"}, 200),
    ],
)
async def test_tcp_needs_the_bearer_token(
    tcp_app: Any, headers: dict[str, str], status: int
) -> None:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=tcp_app), base_url="http://10.0.0.1:7070"
    ) as c:
        r = await c.get("/v1/host", headers=headers)
        assert r.status_code == status, r.text
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
            assert "unauthorized" in r.json()["error"]["message"]
        # The OpenAPI document is behind the token as well.
        assert (await c.get("/openapi.json", headers=headers)).status_code == status


async def test_tcp_without_a_token_configured_is_refused(agent: HostAgent) -> None:
    app = create_app(agent, token=None)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://10.0.0.1:7070"
    ) as c:
        assert (await c.get("/v1/host")).status_code == 403


def test_token_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "token"
    with pytest.raises(ConfigError, match="cannot be opened"):
        read_token(path)
    path.write_bytes(TOKEN + b"\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(path)
    path.chmod(0o600)
    assert read_token(path) == TOKEN
    path.write_bytes(b"short")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(path)


def test_serve_refuses_tcp_without_a_token_file(settings: AgentSettings) -> None:
    with pytest.raises(ConfigError, match="--tcp needs --token-file"):
        serve(settings.model_copy(update={"tcp": "127.0.0.1:0"}))
    assert not settings.socket_path.exists()


# --------------------------------------------------------------------------- Unix socket


@pytest.fixture
def unix_sock(tmp_path: Path) -> Iterator[socket.socket]:
    sock = bind_unix(tmp_path / "s" / "agent.sock")
    yield sock
    sock.close()


def test_unix_socket_is_0600_and_a_second_agent_is_refused(
    unix_sock: socket.socket, tmp_path: Path
) -> None:
    path = tmp_path / "s" / "agent.sock"
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(UsageError, match="another host agent is listening"):
        bind_unix(path)


def test_stale_socket_is_replaced_and_other_files_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    bind_unix(path).close()  # closed: nobody answers any more
    bind_unix(path).close()
    other = tmp_path / "file"
    other.write_text("x")
    with pytest.raises(ConfigError, match="is not a socket"):
        bind_unix(other)


async def test_real_uvicorn_over_the_unix_socket(agent: HostAgent, tmp_path: Path) -> None:
    path = tmp_path / "u.sock"
    sock = bind_unix(path)
    config = uvicorn.Config(create_app(agent, token=TOKEN), lifespan="off", log_level="error")
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://agent"
        ) as c:
            for _ in range(100):
                if server.started:
                    break
                await asyncio.sleep(0.05)
            # No token needed on the Unix socket (its mode guards it), even with one set.
            r = await c.get("/v1/host")
            assert r.status_code == 200, r.text
            assert r.json()["labels"] == {"zone": "a"}
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_sweep_removes_only_stale_unused_spawn_files(agent: HostAgent) -> None:
    import subprocess
    import sys

    state = agent.settings.state_dir
    old_cfg, new_cfg = state / ".config-aa.json", state / ".config-bb.json"
    old_log, record = state / ".spawn-cc.tmp", state / "keep.log"
    live_cfg, live_log = state / ".config-dd.json", state / ".spawn-dd.tmp"
    for path in (old_cfg, new_cfg, old_log, record, live_cfg, live_log):
        path.write_text("x")
    for path in (old_cfg, old_log, record, live_cfg, live_log):
        os.utime(path, (1, 1))
    # A live "supervisor" naming .config-dd.json: its hand-over files are in use.
    code = "import time; time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(state), "vm", live_cfg.name])
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    for _ in range(500):  # until it has exec'd
        if live_cfg.name.encode() in cmdline.read_bytes():
            break
        await asyncio.sleep(0.01)
    try:
        assert sorted(agent.sweep_spawn_files()) == [".config-aa.json", ".spawn-cc.tmp"]
    finally:
        proc.kill()
        proc.wait()
    assert new_cfg.exists() and record.exists() and live_cfg.exists() and live_log.exists()
    assert sorted(agent.sweep_spawn_files()) == [".config-dd.json", ".spawn-dd.tmp"]
