"""The guest-agent methods of a VM handle: ``vm.exec``, ``vm.put_file``, ``vm.agent_ping`` ...

:class:`GuestAgentMixin` gives :class:`~ironclaw_orchestrator.vm.FirecrackerProcess` the
methods of :class:`~.client.AgentClient`, reached over the VM's vsock device
(``VmConfig.vsock_guest_cid``) through Firecracker's host socket inside the jail. Each call
opens its own client (one vsock ``CONNECT`` and handshake, well under a millisecond), so a
handle holds no connection that could outlive the VM or go stale after a snapshot restore.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..errors import AgentConnectionError, AgentError, UsageError
from .protocol import DEFAULT_OUTPUT_LIMIT, DEFAULT_VSOCK_PORT

if TYPE_CHECKING:
    # Imported when the agent is first used: every VM handle has these methods, most VMs
    # never call them, and the client's message models cost start-up time (pydantic).
    from ..vm.config import VmConfig
    from .client import AgentClient
    from .messages import AgentInfo, ExecEvent, ExecResult, FileTransfer

#: How long :meth:`GuestAgentMixin.wait_agent` waits for a booting guest's agent by default.
DEFAULT_AGENT_WAIT_S = 60.0


def vsock_host_path(chroot_dir: Path, uds_path: PurePosixPath | str) -> Path:
    """Host path of a jailed VM's vsock socket (``uds_path`` is jail-relative)."""
    return chroot_dir / str(uds_path).lstrip("/")


class GuestAgentMixin:
    """Run commands and move files in the guest through its ``ironclaw-agent``."""

    config: VmConfig
    #: The guest vsock port the agent listens on.
    agent_port: int = DEFAULT_VSOCK_PORT

    @property
    def vm_id(self) -> str:
        raise NotImplementedError

    def _chroot_dir(self) -> Path | None:
        vmm = getattr(self, "vmm", None)
        chroot = getattr(vmm, "chroot_dir", None)
        return chroot if isinstance(chroot, Path) else None

    @property
    def vsock_path(self) -> Path:
        """Host path of the VM's vsock socket (``UsageError`` without a vsock device)."""
        chroot = self._chroot_dir()
        if self.config.vsock_guest_cid is None or chroot is None:
            raise UsageError(
                f"VM {self.vm_id} has no vsock device, which the guest agent needs: set "
                "VmConfig.vsock_guest_cid (e.g. 3) and run the VM jailed"
            )
        return vsock_host_path(chroot, self.config.vsock_uds_path)

    @contextlib.asynccontextmanager
    async def agent(self, *, connect_timeout_s: float = 10.0) -> AsyncIterator[AgentClient]:
        """A connected :class:`AgentClient` for this VM, closed on exit."""
        from .client import AgentClient

        client = await AgentClient.connect_vsock(
            self.vsock_path, self.agent_port, connect_timeout_s=connect_timeout_s
        )
        try:
            yield client
        finally:
            await client.close()

    async def agent_ping(self) -> AgentInfo:
        """Ask the guest agent whether it is there (raises ``AgentError`` if not)."""
        async with self.agent() as client:
            return await client.ping()

    async def wait_agent(self, timeout_s: float = DEFAULT_AGENT_WAIT_S) -> AgentInfo:
        """Wait until the booting guest's agent answers a ping."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                return await self.agent_ping()
            except AgentConnectionError as exc:
                if loop.time() >= deadline:
                    raise AgentConnectionError(
                        f"VM {self.vm_id}: the guest agent did not answer within {timeout_s} s "
                        f"({exc}); is ironclaw-agent installed and started in the guest "
                        "(ironclaw image add-agent)? See the console log."
                    ) from exc
                await asyncio.sleep(0.05)

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout_s: float | None = None,
        user: str | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        idempotency_key: str | None = None,
    ) -> ExecResult:
        """Run ``argv`` in the guest until its process exits (see :meth:`AgentClient.exec`)."""
        async with self.agent() as client:
            return await client.exec(
                argv, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s, user=user,
                output_limit=output_limit, idempotency_key=idempotency_key,
            )  # fmt: skip

    async def exec_stream(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout_s: float | None = None,
        user: str | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        idempotency_key: str | None = None,
    ) -> AsyncIterator[ExecEvent]:
        """Run ``argv`` in the guest, yielding its events (see :meth:`AgentClient.exec_stream`)."""
        async with self.agent() as client:
            async for event in client.exec_stream(
                argv, env=env, cwd=cwd, stdin=stdin, timeout_s=timeout_s, user=user,
                output_limit=output_limit, idempotency_key=idempotency_key,
            ):  # fmt: skip
                yield event

    async def put_file(
        self,
        local: str | os.PathLike[str],
        guest_path: str,
        *,
        mode: int | None = None,
        mkdirs: bool = True,
    ) -> FileTransfer:
        """Copy a host file into the guest, atomically, verified by SHA-256."""
        async with self.agent() as client:
            return await client.put_file(local, guest_path, mode=mode, mkdirs=mkdirs)

    async def get_file(
        self, guest_path: str, local: str | os.PathLike[str], *, max_bytes: int | None = None
    ) -> FileTransfer:
        """Copy a guest file to the host, atomically, verified by SHA-256."""
        async with self.agent() as client:
            return await client.get_file(guest_path, local, max_bytes=max_bytes)


__all__ = ["AgentError", "GuestAgentMixin", "vsock_host_path"]
