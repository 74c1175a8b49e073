"""A Firecracker process running inside the jailer's sandbox: its handle
(:class:`JailerProcess`) and, with ``--new-pid-ns``, taking over the VMM the jailer forked
(:func:`adopt_vmm`). How the jail is made lives in :mod:`.jailer`."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from types import TracebackType

from .. import names
from ..errors import IronclawError, JailerError, UsageError, VmExitedError
from . import cgroups as cg
from . import cleanup
from . import netns as ns
from .api import FirecrackerApi
from .binaries import Binaries
from .config import JailerConfig
from .consolelog import ConsolePump
from .consoleread import read_tail
from .context import stop_on_exit
from .lifecycle import VmmHandle, exited_error
from .process import ChildProcess
from .resources import JailResources

__all__ = ["JailerProcess", "adopt_vmm"]


class JailerProcess(VmmHandle):
    """A Firecracker process running inside the jailer's sandbox (spec: the jailer handle).

    ``pid`` is the VMM itself (not the jailer), ``api_socket`` its host-side socket path.
    ``async with`` it (or ``async with start_with_jailer(...) as vmm:``) to have it stopped
    and its jail, cgroups and namespace removed when the block ends, however it ends.
    """

    async def __aenter__(self) -> JailerProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await stop_on_exit(self, exc)

    jailed = True

    def __init__(
        self,
        *,
        config: JailerConfig,
        binaries: Binaries,
        process: ChildProcess,
        resources: JailResources,
        console_path: Path,
        api: FirecrackerApi,
        argv: list[str],
        console: ConsolePump | None = None,
    ) -> None:
        super().__init__(
            vm_id=config.jailer_id,
            process=process,
            api=api,
            console_path=console_path,
            console=console,
        )
        self.config = config
        self.binaries = binaries
        self.resources = resources
        self.argv = argv
        self.oom_killed = False
        self._oom_read = False

    @property
    def api_socket(self) -> Path:
        return self.config.api_socket_path

    @property
    def chroot_dir(self) -> Path:
        return self.config.chroot_dir

    @property
    def jail_dir(self) -> Path:
        return self.config.jail_dir

    @property
    def cgroup_paths(self) -> dict[str, Path]:
        cgroups = self.resources.cgroups
        return dict(cgroups.paths) if cgroups is not None else {}

    @property
    def netns_path(self) -> str | None:
        """A path to the VM's network namespace: the given one, ``/run/netns/ironclaw-<id>``
        (a tap, an uplink or a confined jailer), else the VMM's ``/proc/<pid>/ns/net`` while
        it runs (a nameless one, see :mod:`.netns.pool`); ``None`` if it shares the host's."""
        if self.config.netns is not None:
            return self.config.netns
        name = self.resources.netns_name
        if name is not None:
            return str(ns.netns_path(name))
        if self.config.isolate_network and self.process.returncode is None:
            return f"/proc/{self.process.pid}/ns/net"
        return None

    def jail_host_path(self, jail_path: PurePosixPath | str) -> Path:
        """Host path of a path as the VMM sees it."""
        return self.chroot_dir / str(jail_path).lstrip("/")

    def _after_exit(self) -> None:
        """Record whether the memory cgroup OOM-killed the VMM."""
        cgroups = self.resources.cgroups
        if cgroups is None or self._oom_read:
            return
        try:
            kills = cgroups.oom_kills()
        except IronclawError:
            return
        # Called once the VMM has exited (wait, then stop): its cgroup's count is final.
        self._oom_read = True
        self.oom_killed = bool(kills)

    def _release(self) -> None:
        self.resources.vmm_reaped = self.process.returncode is not None
        self.resources.release()

    def _release_inline(self) -> bool:
        self.resources.vmm_reaped = self.process.returncode is not None
        return self.resources.release_inline()

    def stats(self) -> cg.CgroupStats:
        """Resource usage read from the VM's own cgroups."""
        cgroups = self.resources.cgroups
        if cgroups is None:
            raise UsageError(f"VM {self.vm_id} has no cgroups (stopped, or started without limits)")
        return cgroups.stats()


async def adopt_vmm(jailer: ChildProcess, config: JailerConfig, console: Path) -> ChildProcess:
    """With ``--new-pid-ns`` the jailer forks the VMM, writes its pid file and exits 0."""
    # The VMM shares the jailer's stdin pipe: keep its write end open past the jailer's exit.
    stdin_fd = jailer.take_stdin()
    try:
        code = await jailer.wait()
        if code != 0:
            raise exited_error(config.jailer_id, code, console, what="the jailer")
        pid_file = names.pid_file(config.jail_dir)
        try:
            pid = int(_read_small(str(pid_file)))
        except (OSError, ValueError) as exc:
            # The VMM exists all the same: find it by its root (the chroot), kill and reap it.
            killed = cleanup.kill_jail_processes(config.jail_dir)
            found = f"; killed its VMM (pid {', '.join(map(str, killed))})" if killed else ""
            raise JailerError(
                f"VM {config.jailer_id}: the jailer exited 0 but its pid file {pid_file} is "
                f"missing or invalid ({exc}){found}. Is {config.exec_file} from the jailer's "
                f"release? output:\n{read_tail(console)}",
                vm_id=config.jailer_id,
                output_tail=read_tail(console),
            ) from exc
        try:
            vmm = ChildProcess.adopt(pid, stdin_fd=stdin_fd)
        except ProcessLookupError:
            raise VmExitedError(
                f"VM {config.jailer_id}: the VMM (pid {pid}) was gone before it could be "
                f"watched; output:\n{read_tail(console)}",
                vm_id=config.jailer_id,
                output_tail=read_tail(console),
            ) from None
    except BaseException:
        if stdin_fd is not None:
            os.close(stdin_fd)
        raise
    return vmm


def _read_small(path: str) -> bytes:
    """A small file's bytes: one open and one read, no text layer (on every start)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 64)
    finally:
        os.close(fd)
