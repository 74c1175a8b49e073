"""The handle of a running microVM: :class:`FirecrackerProcess` (spec: the handle returned by
``start_firecracker``). How it is started lives in the package's ``__init__``."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from ..agent.vmhandle import GuestAgentMixin
from ..errors import CleanupError, OutOfMemoryError, UsageError
from .api import FirecrackerApi
from .cancelsafe import Resumable
from .config import VmConfig
from .consoleread import dropped_bytes, read_tail
from .context import stop_on_exit
from .hardening import HardeningMixin, VmStats
from .jailer import JailerProcess
from .lifecycle import DEFAULT_STOP_TIMEOUT_S
from .recording import VmRecorder
from .unjailed import UnjailedProcess
from .vsock import VsockLimiter

if TYPE_CHECKING:  # the snapshot code loads on first use: `vm run` never needs it
    from .snapshot import Progress, Snapshot

__all__ = ["FirecrackerProcess"]


class FirecrackerProcess(GuestAgentMixin, HardeningMixin):
    """A running microVM (spec: the handle returned by ``start_firecracker``).

    With a vsock device and ``ironclaw-agent`` in the guest it also runs commands and moves
    files: ``exec``, ``exec_stream``, ``put_file``, ``get_file``, ``agent_ping``,
    ``wait_agent`` (see :class:`~ironclaw_orchestrator.agent.vmhandle.GuestAgentMixin`).
    Rate limits, metered vsock and the seccomp check: :class:`.hardening.HardeningMixin`.

    An async context manager: ``async with vm:`` (or ``async with start_firecracker(cfg) as
    vm:``) stops it and removes everything made for it when the block ends, also on an
    exception or a cancellation.
    """

    async def __aenter__(self) -> FirecrackerProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await stop_on_exit(self, exc)

    def __init__(
        self,
        config: VmConfig,
        vmm: JailerProcess | UnjailedProcess,
        *,
        recorder: VmRecorder | None = None,
    ) -> None:
        self.config = config
        self.vmm = vmm
        self.recorder = recorder
        self.exit_code: int | None = None
        #: The snapshot this VM last wrote or was restored from (a Diff snapshot builds on it).
        self.last_snapshot: Snapshot | None = None
        #: Paused through this handle (``pause()``, a snapshot with ``resume=False``, a
        #: restore with ``resume=False``), so that no state query is needed.
        self.paused = False
        limit = config.vsock_rate_limit
        #: Meters the VM's host-side vsock traffic (``vsock_rate_limit``), ``None`` if unset.
        self.vsock_limiter = VsockLimiter(limit) if limit is not None else None
        self._stopping: Resumable[int | None] = Resumable()

    @property
    def pid(self) -> int:
        """The firecracker process itself (not the jailer)."""
        return self.vmm.pid

    @property
    def socket_path(self) -> Path:
        """Host path of the API socket."""
        return self.vmm.api_socket

    @property
    def is_sandboxed(self) -> bool:
        return isinstance(self.vmm, JailerProcess)

    @property
    def api(self) -> FirecrackerApi:
        """Client for further API calls (paths are jail-relative when sandboxed)."""
        return self.vmm.api

    @property
    def console_path(self) -> Path:
        """File holding the serial console and firecracker's own log."""
        return self.vmm.console_path

    @property
    def vm_id(self) -> str:
        return self.config.vm_id

    @property
    def oom_killed(self) -> bool:
        return isinstance(self.vmm, JailerProcess) and self.vmm.oom_killed

    def console_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the console (across a rotation)."""
        return read_tail(self.console_path, lines)

    @property
    def console_dropped_bytes(self) -> int:
        """Console output dropped so far to stay within ``console_limit_bytes``."""
        console = self.vmm.console
        return console.dropped if console is not None else dropped_bytes(self.console_path)

    async def start_instance(self) -> None:
        """Boot the guest (``InstanceStart``)."""
        if self.vmm.booted:
            raise UsageError(f"VM {self.vm_id} was already started")
        await self.vmm.api.instance_start()
        self.vmm.booted = True
        jailer = self.config.jailer  # no_seccomp is never derived: no jailer_config() needed
        if jailer is None or not jailer.no_seccomp:
            await self._check_seccomp()

    async def wait(self) -> int:
        """Wait for the VMM to exit and return its exit code (0 after a guest reset).

        Raises ``OutOfMemoryError`` when the VMM was killed because its cgroup ran out of
        memory, so that an OOM kill is never mistaken for an unexplained crash.
        """
        code = await self.vmm.wait()
        self.exit_code = code
        self._raise_if_oom(code)
        return code

    def _raise_if_oom(self, code: int) -> None:
        if isinstance(self.vmm, JailerProcess) and self.vmm.oom_killed:
            limit = self.vmm.config.memory_limit_mb
            raise OutOfMemoryError(
                f"VM {self.vm_id}: the VMM was OOM-killed: its cgroup memory limit "
                f"({limit} MiB) was exhausted by guest memory ({self.config.memory_mb} MiB) plus "
                "VMM overhead. Raise jailer.memory_limit_mb (or memory_headroom_mb), or give "
                f"the guest less memory.\n--- console ---\n{self.console_tail()}",
                vm_id=self.vm_id,
                exit_code=code,
                output_tail=self.console_tail(),
            )

    async def stats(self) -> VmStats:
        """Resource usage from the VM's cgroups (jailed VMs only), its seccomp mode, and the
        console bytes dropped to stay within ``console_limit_bytes``."""
        if not isinstance(self.vmm, JailerProcess):
            raise UsageError(
                f"VM {self.vm_id} runs unjailed (development mode): it has no cgroups to read"
            )
        sec = self.seccomp_status()
        return VmStats(
            **vars(self.vmm.stats()), seccomp_mode=sec.mode, seccomp_threads=len(sec.threads),
            console_dropped_bytes=self.console_dropped_bytes,
        )  # fmt: skip

    async def pause(self) -> None:
        """Pause the guest's vCPUs (``PATCH /vm Paused``)."""
        await self.vmm.api.pause()
        self.paused = True

    async def resume(self) -> None:
        """Resume a paused guest."""
        await self.vmm.api.resume()
        self.paused = False

    async def snapshot(
        self,
        dest_dir: Path | str,
        *,
        diff: bool = False,
        resume: bool = True,
        progress: Progress | None = None,
    ) -> Snapshot:
        """Pause, snapshot into the new directory ``dest_dir``, resume unless ``resume=False``.

        See :mod:`.snapshot` for the layout and crash safety.
        """
        from .snapshot import take_snapshot

        return await take_snapshot(self, dest_dir, diff=diff, resume=resume, progress=progress)

    async def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> int | None:
        """Stop the VM and remove everything made for it. Idempotent.

        A booted guest gets Ctrl-Alt-Del and ``timeout_s`` to shut down, then SIGKILL;
        ``timeout_s=0`` kills at once.

        If some cleanup step fails, ``CleanupError`` lists it and the VM's registry record is
        kept, naming what is left, for ``ironclaw gc``. A cancelled caller leaves the stop
        running; calling ``stop()`` again waits for it, or resumes one that was cut short.
        """
        return await self._stopping.run(lambda: self._stop(timeout_s))

    async def _stop(self, timeout_s: float) -> int | None:
        try:
            code = await self.vmm.stop(timeout_s)
        except CleanupError:
            if self.recorder is not None:
                self.recorder.stopped(self, cleaned=False)
            raise
        if self.recorder is not None:
            self.recorder.stopped(self, cleaned=True)
        if code is not None:
            self.exit_code = code
        return code
