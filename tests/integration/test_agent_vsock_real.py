"""The agent protocol through a real, jailed Firecracker: the C vsock test guest.

The guest (agent/guest/vsock_guest.c, compiled here with the system C compiler) answers the
handshake, ping and echo on vsock port 5252; the host side is the project's own
``AgentClient`` over the jail's vsock socket (``CONNECT 5252``). Deadlines only stop a broken
test from hanging; nothing asserts how fast anything is. The snapshot tests check that the
connection works again after a restore: into a fresh jail through the library, and into a
bare firecracker driven through its API.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
from leftovers import leftovers

from ironclaw_orchestrator.agent import AgentClient
from ironclaw_orchestrator.agent.guest import READY_PREFIX, build_vsock_guest
from ironclaw_orchestrator.agent.protocol import encode_frame, read_frame
from ironclaw_orchestrator.errors import AgentConnectionError, AgentRequestError, HostError
from ironclaw_orchestrator.registry import Registry
from ironclaw_orchestrator.vm import VmConfig, restore_snapshot, start_firecracker
from ironclaw_orchestrator.vm.probe import PROBE_BOOT_ARGS
from ironclaw_orchestrator.vm.vsock import connect_vsock

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def guest_kernel() -> Path:
    try:
        return build_vsock_guest()
    except HostError as exc:
        pytest.skip(f"cannot build the vsock test guest: {exc}")


def cfg(vm_id: str, kernel: Path) -> VmConfig:
    return VmConfig(
        vm_id=vm_id,
        kernel_path=str(kernel),
        rootfs_path=None,
        memory_mb=128,
        boot_args=PROBE_BOOT_ARGS,
        vsock_guest_cid=3,
        require_sandbox=True,
    )


async def test_agent_protocol_over_real_vsock(
    vm_id: str, chroot_base: Path, guest_kernel: Path
) -> None:
    vm = await start_firecracker(cfg(vm_id, guest_kernel))
    try:
        await vm.start_instance()
        info = await vm.wait_agent(timeout_s=120)
        assert info.agent_version == "ironclaw-c-guest/1" and info.protocol_version == 1
        assert vm.vsock_path.is_relative_to(vm.vmm.chroot_dir)  # type: ignore[union-attr]
        assert READY_PREFIX in vm.console_tail()

        async with vm.agent(connect_timeout_s=30) as client:
            client.io_timeout_s = 300
            # The guest's own SHA-256 of what it received matches ours.
            small = os.urandom(4096)
            assert await client.echo(small, digest=True) == small
            # 1 MiB there and back; the host compares SHA-256 of what it sent and got.
            data = os.urandom(1024 * 1024)
            back = await client.echo(data, digest=False)
            assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()
            # Requests the test guest does not implement are refused cleanly.
            with pytest.raises(AgentRequestError) as refused:
                await client.exec(["true"], retries=0)
            assert refused.value.code == "unknown_request"

        # Many connections, one after the other, each with its own handshake.
        for _ in range(25):
            assert (await vm.agent_ping()).protocol_version == 1

        # A client offering only an unknown version is refused with a reason.
        reader, writer = await connect_vsock(vm.vsock_path, 5252, timeout_s=30)
        try:
            writer.write(encode_frame({"t": "hello", "proto": "ironclaw-agent", "versions": [99]}))
            frame = await asyncio.wait_for(read_frame(reader), 60)
            assert frame is not None and frame[0]["code"] == "version_mismatch"
        finally:
            writer.close()

        # Nothing listens on another port: Firecracker refuses the CONNECT.
        vm.agent_port = 5253
        with pytest.raises(AgentConnectionError, match="5253"):
            await vm.agent_ping()
        vm.agent_port = 5252
        assert (await vm.agent_ping()).agent_version == "ironclaw-c-guest/1"
    finally:
        await vm.stop()


def cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ironclaw_orchestrator.cli", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_exec_reaches_a_detached_vm(
    tmp_path: Path, vm_id: str, chroot_base: Path, guest_kernel: Path
) -> None:
    """``vm exec`` finds the VM's vsock socket from its registry record, for real."""
    state = tmp_path / "state"
    config = tmp_path / "vm.toml"
    config.write_text("vsock_guest_cid = 3\nmemory_mb = 128\n")
    started = cli(
        state, "vm", "start", "-d", "--id", vm_id, "--kernel", str(guest_kernel),
        "--boot-args", PROBE_BOOT_ARGS, "-c", str(config),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        record = Registry(state).get(vm_id)
        assert record is not None and record.jail_dir is not None
        # The C guest answers the handshake, then refuses `exec`: the CLI says so.
        result = None
        for _ in range(60):
            result = cli(state, "vm", "exec", vm_id, "--", "true")
            if "unknown_request" in result.stderr or "only answers" in result.stderr:
                break
        assert result is not None and result.returncode == 1, result
        assert "only answers hello, ping and echo" in result.stderr
    finally:
        stopped = cli(state, "vm", "stop", vm_id)
        assert stopped.returncode == 0, stopped.stderr


async def test_agent_works_again_after_restore_into_a_fresh_jail(
    vm_id: str, chroot_base: Path, guest_kernel: Path, tmp_path: Path
) -> None:
    """The guest agent answers over a clone's own vsock socket, in the clone's own jail."""
    clone_id = f"{vm_id}-c"
    vm = await start_firecracker(cfg(vm_id, guest_kernel))
    try:
        await vm.start_instance()
        await vm.wait_agent(timeout_s=120)
        snap = await vm.snapshot(tmp_path / "snap")
    finally:
        await vm.stop()
    clone = await restore_snapshot(snap, clone_id)
    try:
        assert clone.vsock_path.is_relative_to(clone.vmm.chroot_dir)  # type: ignore[union-attr]
        assert clone.vsock_path != vm.vsock_path
        info = await clone.wait_agent(timeout_s=120)  # after the guest's transport reset
        assert info.agent_version == "ironclaw-c-guest/1"
        async with clone.agent(connect_timeout_s=30) as client:
            client.io_timeout_s = 300
            data = os.urandom(64 * 1024)
            assert await client.echo(data, digest=False) == data
    finally:
        await clone.stop()
    left = leftovers(clone_id)
    assert not left, f"the clone left resources behind: {left}"


async def _api(sock: Path, method: str, path: str, body: dict[str, object] | None = None) -> None:
    transport = httpx.AsyncHTTPTransport(uds=str(sock))
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        response = await http.request(method, path, json=body, timeout=60)
    assert response.status_code in (200, 204), f"{method} {path}: {response.text}"


async def _firecracker(binary: str, workdir: Path, name: str) -> asyncio.subprocess.Process:
    sock = workdir / f"{name}.sock"
    with (workdir / f"{name}.out").open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary, "--api-sock", str(sock), stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    for _ in range(3000):
        if sock.exists() or proc.returncode is not None:
            break
        await asyncio.sleep(0.01)
    assert sock.exists(), (workdir / f"{name}.out").read_text()
    return proc


async def test_agent_connection_works_again_after_snapshot_restore(
    real_host: None, guest_kernel: Path
) -> None:
    """Snapshot a running guest, load it into a fresh VMM: the guest gets a transport reset,
    and the same client (whose pooled connection died with the old VMM) carries on."""
    binary = os.environ.get("IRONCLAW_FIRECRACKER") or shutil.which("firecracker")
    assert binary is not None
    workdir = Path(tempfile.mkdtemp(prefix="ica-snap-", dir="/tmp"))
    procs: list[asyncio.subprocess.Process] = []
    try:
        first = await _firecracker(binary, workdir, "api1")
        procs.append(first)
        api1 = workdir / "api1.sock"
        vsock = workdir / "v.sock"
        await _api(api1, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        await _api(
            api1, "PUT", "/boot-source",
            {"kernel_image_path": str(guest_kernel), "boot_args": PROBE_BOOT_ARGS},
        )  # fmt: skip
        await _api(api1, "PUT", "/vsock", {"vsock_id": "v", "guest_cid": 3, "uds_path": str(vsock)})
        await _api(api1, "PUT", "/actions", {"action_type": "InstanceStart"})
        client = None
        for _ in range(600):
            try:
                client = await AgentClient.connect_vsock(vsock, connect_timeout_s=30)
                break
            except AgentConnectionError:
                await asyncio.sleep(0.1)
        assert client is not None, "the guest never answered"
        try:
            assert (await client.ping()).agent_version == "ironclaw-c-guest/1"
            await _api(api1, "PATCH", "/vm", {"state": "Paused"})
            await _api(
                api1, "PUT", "/snapshot/create",
                {"snapshot_type": "Full", "snapshot_path": str(workdir / "snap"),
                 "mem_file_path": str(workdir / "mem")},
            )  # fmt: skip
            first.kill()
            await first.wait()
            vsock.unlink()
            second = await _firecracker(binary, workdir, "api2")
            procs.append(second)
            await _api(
                workdir / "api2.sock", "PUT", "/snapshot/load",
                {"snapshot_path": str(workdir / "snap"), "mem_file_path": str(workdir / "mem"),
                 "resume_vm": True},
            )  # fmt: skip
            client.io_timeout_s = 300
            info = await client.ping()  # the pooled connection is dead: it reconnects
            assert info.agent_version == "ironclaw-c-guest/1"
            data = os.urandom(256 * 1024)
            assert await client.echo(data, digest=False) == data
        finally:
            await client.close()
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
