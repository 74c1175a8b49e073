"""``POST /v1/vms/{id}/exec`` end to end without a VM: the host agent finds the VM's vsock
socket from its record and talks to a real ``ironclaw-agent``, behind a stand-in for
Firecracker's vsock multiplexer (``CONNECT <port>`` / ``OK <port>``)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ironclaw_orchestrator.server import AgentSettings, HostAgent, create_app


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.fixture
async def guest(tmp_path: Path) -> AsyncIterator[Path]:
    """A real guest agent on a Unix socket, reachable as vsock port 5252 via ``vsock.sock``."""
    agent_sock = tmp_path / "guest-agent.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ironclaw_orchestrator.agent", "--listen", f"unix:{agent_sock}"]
    )
    for _ in range(200):
        if agent_sock.exists():
            break
        await asyncio.sleep(0.05)

    async def muxer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line != b"CONNECT 5252\n":
            writer.close()
            return
        g_reader, g_writer = await asyncio.open_unix_connection(str(agent_sock))
        writer.write(b"OK 1073741824\n")
        await asyncio.gather(_pipe(reader, g_writer), _pipe(g_reader, writer))

    chroot = tmp_path / "jail" / "firecracker" / "ex-1" / "root"
    (chroot / "run").mkdir(parents=True)
    server = await asyncio.start_unix_server(muxer, str(chroot / "run" / "vsock.sock"))
    try:
        yield chroot.parent
    finally:
        server.close()
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, HostAgent]]:
    settings = AgentSettings(
        socket_path=tmp_path / "agent.sock",
        state_dir=tmp_path / "state",
        run_dir=tmp_path / "run",
        chroot_base=tmp_path / "jail",
        image_dirs=(tmp_path,),
    )
    agent = HostAgent(settings)
    await agent.startup()
    app = create_app(agent)

    async def unix(scope: dict[str, object], receive: object, send: object) -> None:
        await app({**scope, "server": ("agent.sock", None)}, receive, send)  # type: ignore[arg-type]

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=unix), base_url="http://agent", timeout=60
    ) as c:
        yield c, agent


async def test_exec_runs_in_the_guest_and_reports_exit_output_and_timeout(
    guest: Path, client: tuple[httpx.AsyncClient, HostAgent]
) -> None:
    c, agent = client
    agent.registry.claim("ex-1", jail_dir=guest, config={"vsock_guest_cid": 3})
    r = await c.post(
        "/v1/vms/ex-1/exec",
        json={"argv": ["sh", "-c", "cat; echo err >&2; exit 3"], "stdin": "hi\n"},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["exit_code"], out["stdout"], out["stderr"]) == (3, "hi\n", "err\n")
    assert out["timed_out"] is False and out["encoding"] == "text"

    r = await c.post(
        "/v1/vms/ex-1/exec",
        json={"argv": ["printf", "\\377"], "output": "base64", "env": {"A": "1"}},
    )
    assert base64.b64decode(r.json()["stdout"]) == b"\xff"

    r = await c.post("/v1/vms/ex-1/exec", json={"argv": ["sleep", "30"], "timeout_s": 0.5})
    assert r.json()["timed_out"] is True and r.json()["exit_code"] == 137

    r = await c.post("/v1/vms/ex-1/exec", json={"argv": ["true"], "cwd": "/nonexistent-dir"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["type"] == "AgentRequestError" and r.json()["error"]["reason"]
    agent.registry.release("ex-1")


async def test_exec_errors_are_clear(
    client: tuple[httpx.AsyncClient, HostAgent], tmp_path: Path
) -> None:
    c, agent = client
    assert (await c.post("/v1/vms/none/exec", json={"argv": ["true"]})).status_code == 404
    agent.registry.claim("novsock", jail_dir=tmp_path / "jail" / "x", config={})
    r = await c.post("/v1/vms/novsock/exec", json={"argv": ["true"]})
    assert r.status_code == 409 and "no vsock device" in r.json()["error"]["message"]
    agent.registry.claim("deaf", jail_dir=tmp_path / "jail" / "y", config={"vsock_guest_cid": 3})
    r = await c.post("/v1/vms/deaf/exec", json={"argv": ["true"]})
    assert r.status_code == 502 and r.json()["error"]["type"] == "AgentConnectionError"
    for body, needle in (({"argv": []}, "argv"), ({"argv": ["x"], "bogus": 1}, "bogus")):
        r = await c.post("/v1/vms/deaf/exec", json=body)
        assert r.status_code == 422 and needle in r.json()["error"]["message"]
    r = await c.post("/v1/vms/deaf/exec", json={"argv": ["cat"], "stdin": "a", "stdin_b64": "YQ=="})
    assert r.status_code == 422 and "not both" in r.json()["error"]["message"]
    for vm_id in ("novsock", "deaf"):
        agent.registry.release(vm_id)


async def test_files_up_and_down_verified_and_bounded(
    guest: Path, client: tuple[httpx.AsyncClient, HostAgent], tmp_path: Path
) -> None:
    c, agent = client
    agent.registry.claim("ex-1", jail_dir=guest, config={"vsock_guest_cid": 3})
    target = tmp_path / "in-guest" / "job.bin"  # the "guest" is this host here
    data = bytes(range(256)) * 4096
    r = await c.put(
        "/v1/vms/ex-1/files", params={"path": str(target), "mode": "0750"}, content=data
    )
    assert r.status_code == 200, r.text
    assert r.json()["size"] == len(data) and target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o750

    r = await c.get("/v1/vms/ex-1/files", params={"path": str(target)})
    assert r.status_code == 200 and r.content == data

    r = await c.get("/v1/vms/ex-1/files", params={"path": str(tmp_path / "missing")})
    assert r.status_code == 422 and r.json()["error"]["type"] == "AgentRequestError"
    r = await c.put("/v1/vms/ex-1/files", params={"path": "relative.txt"}, content=b"x")
    assert r.status_code == 422 and "must be absolute" in r.json()["error"]["message"]
    r = await c.put("/v1/vms/ex-1/files", params={"path": "/x", "mode": "999"}, content=b"x")
    assert r.status_code == 422

    agent.settings = agent.settings.model_copy(update={"max_file_bytes": 1000})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 500

    app_c = httpx.AsyncClient(
        transport=httpx.ASGITransport(
            app=_unix(create_app(agent))  # the new limit
        ),
        base_url="http://agent",
    )
    async with app_c:
        r = await app_c.put("/v1/vms/ex-1/files", params={"path": "/tmp/big"}, content=chunks())
        assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
        r = await app_c.put("/v1/vms/ex-1/files", params={"path": "/tmp/big"}, content=b"z" * 2000)
        assert r.status_code == 413
    assert not list((agent.settings.run_dir / "transfers").iterdir())
    agent.registry.release("ex-1")


def _unix(app: object) -> object:
    async def wrapped(scope: dict[str, object], receive: object, send: object) -> None:
        await app({**scope, "server": ("agent.sock", None)}, receive, send)  # type: ignore[operator]

    return wrapped
