"""Readiness and stopping, shared by jailed and unjailed VMMs.

Ready means: the API socket file exists AND ``GET /`` answers. If the VMM (or the jailer)
dies first we raise at once with its exit status and the tail of its output.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import (
    ApiError,
    ApiSocketTimeoutError,
    JailerError,
    VmExitedError,
)
from .api import Call, FirecrackerApi
from .cancelsafe import Resumable, finish
from .config import MAX_SOCKET_PATH_BYTES
from .consolelog import ConsolePump
from .consoleread import read_tail
from .fswatch import PathWatch
from .process import ChildProcess

DEFAULT_READY_TIMEOUT_S = 10.0
DEFAULT_STOP_TIMEOUT_S = 3.0
#: How often readiness is polled where no file event can tell (the socket exists but refuses
#: connections, or no inotify watch could be added): 1 ms.
_POLL_S = 0.001
#: A watched wait looks again after this long even without an event (a safety net only).
_WATCH_FALLBACK_S = 0.05
_DESCRIBE: Call = ("GET", "/", None)  # answering at all means the API is ready
_JAILER_ERROR = re.compile(r"Jailer error: (.*)")


def parse_jailer_error(text: str) -> str | None:
    """The reason from the jailer's ``Jailer error: <reason>`` panic line, if any."""
    found = _JAILER_ERROR.findall(text)
    return found[-1].strip() if found else None


def exited_error(
    vm_id: str, code: int, console_path: Path | None, *, what: str = "the VMM"
) -> VmExitedError | JailerError:
    """An error for a VMM/jailer that exited before it was ready."""
    tail = read_tail(console_path)
    reason = parse_jailer_error(tail)
    status = f"signal {-code}" if code < 0 else f"status {code}"
    if reason is not None:
        return JailerError(
            f"VM {vm_id}: the jailer refused to start it ({status}): Jailer error: {reason}\n"
            f"{jailer_hint(reason)}\n--- output ({console_path}) ---\n{tail}",
            vm_id=vm_id,
            reason=reason,
            exit_code=code,
            output_tail=tail,
        )
    return VmExitedError(
        f"VM {vm_id}: {what} exited with {status} before its API was ready. Check the output "
        f"below, the cgroup limits (memory too low?) and /dev/kvm access.\n"
        f"--- output ({console_path}) ---\n{tail or '(no output)'}",
        vm_id=vm_id,
        exit_code=code,
        output_tail=tail,
    )


def jailer_hint(reason: str) -> str:
    """A fix for the jailer's common refusals (spec: Troubleshooting)."""
    r = reason.lower()
    if "canonicalize" in r or "chroot" in r:
        return "Fix: create the chroot base directory (mkdir -p /var/jail; chmod 755 /var/jail)."
    if "controller" in r and "unavailable" in r:
        return (
            "Fix: that cgroup controller is not available in the requested cgroup version; "
            "use cgroup_version=1 on v1/hybrid hosts, or enable cgroup v2 "
            "(systemd.unified_cgroup_hierarchy=1)."
        )
    if "cgroup" in r:
        return "Fix: check the cgroup limits and that the controllers are mounted and delegated."
    if "netns" in r or "namespace" in r:
        return "Fix: check the network namespace path exists (ip netns list)."
    if "instance id" in r:
        return "Fix: use an id of 1-64 characters from A-Z, a-z, 0-9 and '-'."
    if "exec" in r and "file" in r:
        return "Fix: point exec_file at the firecracker binary of the jailer's release."
    return "Fix: see the jailer's reason above."


async def wait_ready(
    process: ChildProcess,
    api: FirecrackerApi,
    socket_path: Path,
    *,
    vm_id: str,
    console_path: Path | None,
    timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    then: Sequence[Call] = (),
) -> None:
    """Wait until the API answers; raise at once if the process dies first.

    ``then`` (pre-boot configuration) goes pipelined with the ``GET /`` that finds the API
    ready; one of them rejected by the answering server raises its ``ApiError`` at once.
    """
    ready = [_DESCRIBE, *then]
    deadline = time.monotonic() + timeout_s
    path = str(socket_path)
    last_error: Exception | None = None
    loop = asyncio.get_running_loop()
    # Woken when the socket file is created (inotify) or the process exits (its pidfd),
    # not by a poll: exact, one wake-up where a 1 ms poll lost up to a millisecond.
    watch = PathWatch(socket_path)
    pidfd = process.pidfd
    try:
        while True:
            if (code := process.poll()) is not None:
                raise exited_error(vm_id, code, console_path)
            wake: asyncio.Future[None] | None = None
            if os.path.exists(path):
                try:
                    wait_s = max(0.05, min(1.0, deadline - time.monotonic()))
                    # The probe's budget is for the first answer (GET /); the configuration
                    # behind it then gets the API's own timeout, as if sent alone.
                    await api.request_all(ready, first_timeout_s=wait_s)
                    return
                except ApiError as exc:
                    if exc.status_code is not None:
                        raise  # the API answered: a rejected request is final
                    last_error = exc  # there but not answering: no file event will come
            else:
                wake = loop.create_future()
                if not watch.wake_on_change(wake):
                    wake = None  # no watch to be had: poll
                elif os.path.exists(path):
                    continue  # created before the watch was added
            now = time.monotonic()
            if now >= deadline:
                break
            if wake is None:
                await asyncio.sleep(_POLL_S)
            else:
                # Without the pidfd (wait() watches it) an exit is seen by a 1 ms look.
                fallback_s = _WATCH_FALLBACK_S if pidfd is not None else _POLL_S
                await _woken(wake, pidfd, min(fallback_s, deadline - now))
    finally:
        watch.close()
    budget = len(str(socket_path).encode())
    if not socket_path.exists():
        cause = "the socket file was never created"
    else:
        cause = f"the socket exists but does not answer ({last_error})"
    hint = (
        f" The path is {budget} bytes, over the {MAX_SOCKET_PATH_BYTES}-byte limit: "
        "use a shorter chroot base or id."
        if budget > MAX_SOCKET_PATH_BYTES
        else " Check the VMM's output and that it runs (ps -p "
        f"{process.pid}); raise the ready timeout on a loaded host."
    )
    raise ApiSocketTimeoutError(
        f"VM {vm_id}: API socket {socket_path} not ready after {timeout_s:.1f}s: {cause}.{hint}"
        f"\n--- output ({console_path}) ---\n{read_tail(console_path) or '(no output)'}",
        vm_id=vm_id,
    )


async def _woken(wake: asyncio.Future[None], pidfd: int | None, timeout_s: float) -> None:
    """Wait for ``wake`` (set by the file watch), the process's exit, or ``timeout_s``."""
    loop = asyncio.get_running_loop()
    timer = loop.call_later(timeout_s, _set_done, wake)
    if pidfd is not None:
        loop.add_reader(pidfd, _set_done, wake)
    try:
        await wake
    finally:
        timer.cancel()
        if pidfd is not None:
            loop.remove_reader(pidfd)  # before poll() may reap the process and close it


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class VmmHandle:
    """What jailed and unjailed VMMs share: the process, its API, waiting and stopping.

    Subclasses say what else was made for the VM (``_release``) and what to learn from an
    exit (``_after_exit``, e.g. an OOM kill recorded by the cgroup).
    """

    jailed: bool = False

    def __init__(
        self,
        *,
        vm_id: str,
        process: ChildProcess,
        api: FirecrackerApi,
        console_path: Path,
        console: ConsolePump | None = None,
    ) -> None:
        self.vm_id = vm_id
        self.process = process
        self.api = api
        self.console_path = console_path
        #: Reads the VMM's output into ``console_path`` within its byte budget.
        self.console = console
        self.booted = False
        self._stopping: Resumable[int | None] = Resumable()
        self._stop_begun = False

    @property
    def pid(self) -> int:
        """The firecracker process itself."""
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        """Wait for the VMM to exit; return its exit code (``-N``: killed by signal N)."""
        if self.console is not None:
            self.console.attach()  # again, if this is another event loop than the start's
        code = await self.process.wait()
        self._after_exit()
        return code

    async def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """Stop the VMM (graceful if booted, then SIGKILL), reap it, remove every resource.

        Idempotent: once done, a call only returns the exit code. A cancelled caller leaves
        the stop running; calling again waits for it, or (if the stop itself was cut short,
        or a clean-up step failed) resumes it: only what is left is done again.
        """
        return await self._stopping.run(lambda: self._stop(timeout_s))

    async def _stop(self, timeout_s: float) -> int | None:
        # Graceful only the first time: a resumed stop goes straight to SIGKILL.
        graceful, self._stop_begun = self.booted and not self._stop_begun, True
        try:
            code: int | None = await stop_process(
                self.process, self.api, graceful=graceful, timeout_s=timeout_s
            )
            self._after_exit()
        except BaseException:
            # Whatever went wrong (a cancel too), the VMM never outlives its resources.
            self.process.kill()
            await finish(self.process.wait())
            raise
        finally:
            if self.console is not None and self.process.returncode is not None:
                self.console.close()
            await self.api.aclose()
            if not self._release_inline():
                await finish(asyncio.get_running_loop().run_in_executor(None, self._release))
        return code

    def _after_exit(self) -> None:
        """Hook: inspect why the VMM ended."""

    def _release(self) -> None:
        """Hook: remove what was made for this VM (must be idempotent; runs in a thread)."""

    def _release_inline(self) -> bool:
        """Hook: :meth:`_release` on the event loop if its work is short; ``False`` leaves
        what is left to :meth:`_release`."""
        return False


async def abort_start(process: ChildProcess | None, api: FirecrackerApi | None) -> None:
    """Undo a half-finished start: kill and reap the VMM, close the API client."""
    if process is not None:
        process.kill()
        await asyncio.shield(process.wait())
    if api is not None:
        await api.aclose()


async def stop_process(
    process: ChildProcess,
    api: FirecrackerApi | None,
    *,
    graceful: bool,
    timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
) -> int:
    """Stop the VMM: ``SendCtrlAltDel`` when booted, then SIGKILL after ``timeout_s``; reap.

    With ``--new-pid-ns`` the VMM is PID 1 of its namespace and ignores SIGTERM, so the
    only graceful path is the guest's own reboot on Ctrl-Alt-Del. ``timeout_s=0`` gives
    the guest no time, so it sends nothing: SIGKILL at once.
    """
    if (code := process.poll()) is not None:
        return code
    if graceful and api is not None and timeout_s > 0:
        try:
            await api.send_ctrl_alt_del()
            return await process.wait(timeout_s)
        except (ApiError, TimeoutError):
            pass  # guest ignores it, or the API is gone: fall through to kill
    process.send_signal(signal.SIGKILL)
    return await process.wait()
