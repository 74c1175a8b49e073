"""Readiness is woken by the socket's creation (inotify) and by the process's exit (its
pidfd), not by a poll: work counts of the wait, the watch's own bookkeeping, the fallbacks."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from ironclaw_orchestrator.errors import VmExitedError
from ironclaw_orchestrator.vm import fswatch, lifecycle
from ironclaw_orchestrator.vm.api import FirecrackerApi
from ironclaw_orchestrator.vm.lifecycle import wait_ready
from ironclaw_orchestrator.vm.process import ChildProcess

OK = b'HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{"state": "up"}'


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


class Counts:
    def __init__(self) -> None:
        self.sleeps = 0
        self.wakes = 0


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    """Counts polls (sleeps) and watched waits; the safety-net timer is pushed out of reach,
    so a wait that ends was woken by an event, not by the timer."""
    counts = Counts()
    real_sleep, real_woken = asyncio.sleep, lifecycle._woken

    async def sleep(delay: float, *args: Any) -> Any:
        counts.sleeps += delay == lifecycle._POLL_S  # the readiness poll (asyncio is shared)
        return await real_sleep(delay, *args)

    async def woken(*args: Any) -> None:
        counts.wakes += 1
        await real_woken(*args)

    monkeypatch.setattr(lifecycle.asyncio, "sleep", sleep)
    monkeypatch.setattr(lifecycle, "_woken", woken)
    monkeypatch.setattr(lifecycle, "_WATCH_FALLBACK_S", 60.0)
    return counts


@pytest.fixture
async def sleeper(tmp_path: Path) -> AsyncIterator[ChildProcess]:
    proc = ChildProcess.spawn(["/bin/sleep", "30"], stdout_path=tmp_path / "out")
    yield proc
    proc.kill()
    await proc.wait()


def later(delay: float, fn: Callable[[], Any]) -> asyncio.Task[Any]:
    async def run() -> Any:
        await asyncio.sleep(delay)
        result = fn()
        return await result if asyncio.iscoroutine(result) else result

    return asyncio.ensure_future(run())


async def test_a_socket_made_later_wakes_the_wait_without_polling(
    tmp_path: Path, counts: Counts, sleeper: ChildProcess
) -> None:
    """The socket's directory does not exist yet either (the jail's ``run``): the watch
    moves down to it when it appears, then the socket's creation ends the wait."""
    sock = tmp_path / "run" / "api.sock"

    async def serve() -> asyncio.Server:
        (tmp_path / "run").mkdir()
        await asyncio.sleep(0.05)
        return await asyncio.start_unix_server(_answer, path=str(sock))

    making = later(0.1, serve)
    try:
        async with FirecrackerApi(sock, vm_id="w") as api:
            await wait_ready(sleeper, api, sock, vm_id="w", console_path=None, timeout_s=30)
    finally:
        server = await making
        server.close()
        await server.wait_closed()
    assert counts.sleeps == 0  # never polled
    assert 1 <= counts.wakes <= 2  # the directory, then the socket (one wake if both at once)
    inst = fswatch._instances.get(asyncio.get_running_loop())
    assert inst is not None and not inst._waiters and not inst._refs  # watch removed
    assert not inst._reading  # the loop no longer reads the instance


async def test_the_process_exiting_wakes_the_wait_at_once(tmp_path: Path, counts: Counts) -> None:
    out = tmp_path / "out"
    script = tmp_path / "prog"
    script.write_text("#!/bin/sh\necho 'last words'\nsleep 0.2\nexit 3\n")
    script.chmod(0o755)
    proc = ChildProcess.spawn([str(script)], stdout_path=out)
    sock = tmp_path / "api.sock"
    async with FirecrackerApi(sock, vm_id="w") as api:
        with pytest.raises(VmExitedError, match="last words") as info:
            await wait_ready(proc, api, sock, vm_id="w", console_path=out, timeout_s=30)
    assert info.value.exit_code == 3
    assert counts.sleeps == 0 and counts.wakes == 1  # woken by the exit itself


async def test_without_a_watch_readiness_polls(
    tmp_path: Path, counts: Counts, sleeper: ChildProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of inotify watches (a host limit): the wait polls, as it did before watches."""

    def no_watch(self: object, path: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(fswatch._Inotify, "add_watch", no_watch)
    sock = tmp_path / "api.sock"
    making = later(0.05, lambda: asyncio.start_unix_server(_answer, path=str(sock)))
    try:
        async with FirecrackerApi(sock, vm_id="w") as api:
            await wait_ready(sleeper, api, sock, vm_id="w", console_path=None, timeout_s=30)
    finally:
        server = await making
        server.close()
        await server.wait_closed()
    assert counts.sleeps >= 1 and counts.wakes == 0


async def test_two_waits_on_one_directory_share_its_watch(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    first, second = fswatch.PathWatch(tmp_path / "a"), fswatch.PathWatch(tmp_path / "b")
    woke_first, woke_second = loop.create_future(), loop.create_future()
    assert first.wake_on_change(woke_first) and second.wake_on_change(woke_second)
    first.close()  # must not remove the watch the second still uses
    (tmp_path / "b").touch()
    await asyncio.wait_for(woke_second, 30)
    assert not woke_first.done()
    second.close()
    inst = fswatch._instances.get(asyncio.get_running_loop())
    assert inst is not None and not inst._refs and not inst._waiters and not inst._reading
    assert first.watches == second.watches == 1


async def test_one_instance_per_loop_and_none_shared_with_a_forked_child(
    tmp_path: Path,
) -> None:
    watch = fswatch.PathWatch(tmp_path / "x")
    assert watch.wake_on_change(asyncio.get_running_loop().create_future())
    watch.close()
    kept = fswatch.kept_fds()
    assert len(kept) == 1
    again = fswatch.PathWatch(tmp_path / "y")
    assert again.wake_on_change(asyncio.get_running_loop().create_future())
    again.close()
    assert fswatch.kept_fds() == kept  # reused: closing an instance costs an RCU wait
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0 if not fswatch._instances and not fswatch.kept_fds() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_event_loops_in_two_threads_keep_their_own_instance(tmp_path: Path) -> None:
    """A program may run an event loop per thread: neither closes the other's instance."""

    async def wait_for(name: str) -> int:
        loop = asyncio.get_running_loop()
        watch, woke = fswatch.PathWatch(tmp_path / name), loop.create_future()
        assert watch.wake_on_change(woke)
        loop.call_later(0.05, (tmp_path / name).touch)
        await asyncio.wait_for(woke, 30)
        watch.close()
        return fswatch._instances[loop].fd

    results: list[int] = []
    threads = [
        threading.Thread(target=lambda n=n: results.append(asyncio.run(wait_for(n))))
        for n in ("a", "b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and results[0] != results[1]


async def test_a_cancelled_wait_leaves_no_watch_and_no_reader(
    tmp_path: Path, counts: Counts, sleeper: ChildProcess
) -> None:
    """Cancelled while watching (asyncio.timeout around a start): the watch, the pidfd
    reader and the timer go with it."""
    sock = tmp_path / "api.sock"
    async with FirecrackerApi(sock, vm_id="w") as api:
        task = asyncio.ensure_future(
            wait_ready(sleeper, api, sock, vm_id="w", console_path=None, timeout_s=30)
        )
        for _ in range(1000):
            await asyncio.sleep(0.005)
            if counts.wakes:
                break
        assert counts.wakes == 1  # it is waiting on the watch now
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    inst = fswatch._instances.get(asyncio.get_running_loop())
    assert inst is not None and not inst._waiters and not inst._refs and not inst._reading
    assert sleeper.pidfd is not None
    assert not asyncio.get_running_loop().remove_reader(sleeper.pidfd)  # none left


async def test_a_process_wait_already_watches_keeps_its_reader(tmp_path: Path) -> None:
    """wait() owns the pidfd's reader once called: readiness must not replace it (a later
    wait() would never wake), and still sees the exit."""
    out, script = tmp_path / "out", tmp_path / "prog"
    script.write_text("#!/bin/sh\nsleep 0.2\nexit 4\n")
    script.chmod(0o755)
    proc = ChildProcess.spawn([str(script)], stdout_path=out)
    with pytest.raises(TimeoutError):
        await proc.wait(0.01)  # leaves its reader registered
    sock = tmp_path / "api.sock"
    async with FirecrackerApi(sock, vm_id="w") as api:
        with pytest.raises(VmExitedError):
            await wait_ready(proc, api, sock, vm_id="w", console_path=out, timeout_s=30)
    assert await asyncio.wait_for(proc.wait(), 30) == 4
