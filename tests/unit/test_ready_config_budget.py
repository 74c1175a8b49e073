"""A jailed start's configuration rides in the readiness probe, whose per-attempt budget is
min(1 s, time left). That budget is for the first answer: a VMM that answers GET / at once
but takes longer over its configuration (a loaded host) gets the API's own timeout for it,
and is not reported as "not ready"."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.lifecycle import wait_ready

OK = b"HTTP/1.1 204 No Content\r\n\r\n"
DESCRIBE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class _Alive:
    pid = 1
    pidfd = None

    def poll(self) -> int | None:
        return None


async def test_slow_configuration_is_not_a_readiness_timeout(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                if head.startswith(b"GET"):
                    writer.write(DESCRIBE)
                else:
                    await asyncio.sleep(1.2)  # a PUT on a busy host
                    writer.write(OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path=str(sock))
    api = FirecrackerApi(sock, vm_id="slow")
    try:
        await wait_ready(
            _Alive(),
            api,
            sock,
            vm_id="slow",
            console_path=None,
            timeout_s=5.0,  # type: ignore[arg-type]
            then=[("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})],
        )
    finally:
        await api.aclose()
        server.close()
        await server.wait_closed()
