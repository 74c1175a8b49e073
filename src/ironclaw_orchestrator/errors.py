"""The one exception tree of ironclaw-orchestrator.

Every message names what failed (VM id, path, value) and says how to fix it::

    IronclawError                     base of everything we raise
    ├── ConfigError                   bad input; raised before anything is spawned or written
    ├── UsageError                    misuse of a handle: start twice, use after stop
    ├── HostError                     the host is not ready to run (jailed) VMs
    │   ├── BinaryNotFoundError       firecracker or jailer missing
    │   │   └── JailerNotFoundError   the jailer specifically (spec: "Jailer Not Found")
    │   ├── VersionMismatchError      jailer and firecracker versions differ
    │   ├── SandboxRequiredError      production mode, but jailing is impossible here
    │   ├── ChrootBaseError           chroot base missing, not writable, or noexec/nodev
    │   ├── KvmUnavailableError       /dev/kvm missing or not accessible
    │   └── CgroupError               a cgroup could not be set up (controller, file, value)
    │       └── CgroupControllerUnavailableError
    ├── StagingError                  placing kernel/rootfs/log files in the jail failed
    ├── NetworkError                  netns / tap / vsock set-up failed
    ├── AgentError                    the guest agent (ironclaw-agent) failed or misbehaved
    │   ├── AgentConnectionError      cannot reach the agent, or the connection was lost
    │   ├── AgentProtocolError        malformed or hostile frames from the other end
    │   │   └── AgentVersionMismatchError  the two ends speak no common protocol version
    │   ├── AgentRequestError         the agent refused a request (bad path, spawn failed)
    │   └── TransferIntegrityError    a file's size or SHA-256 did not match end to end
    ├── VmError                       the VMM (or the jailer launching it) failed
    │   ├── JailerError               the jailer refused (its "Jailer error: ..." parsed)
    │   ├── VmExitedError             the VMM exited before it was ready / unexpectedly
    │   │   └── OutOfMemoryError      ... because its memory cgroup ran out (OOM kill)
    │   ├── ApiSocketTimeoutError     the API socket did not answer in time
    │   └── ApiError                  Firecracker answered an API call with an error
    ├── CleanupError                  one or more cleanup steps failed (all steps still ran)
    ├── RegistryError                 the state directory / VM registry is unusable
    └── InstallError                  `ironclaw install` failed; nothing was installed
"""

from __future__ import annotations

from collections.abc import Sequence


class IronclawError(Exception):
    """Base class of every error raised by ironclaw-orchestrator."""


class ConfigError(IronclawError, ValueError):
    """Invalid configuration; raised before anything is spawned or written."""


class UsageError(IronclawError):
    """A handle was used wrongly (e.g. started twice, used after stop)."""


class HostError(IronclawError):
    """The host lacks something needed to run (jailed) microVMs."""


class BinaryNotFoundError(HostError):
    """The firecracker or jailer binary could not be found."""


class JailerNotFoundError(BinaryNotFoundError):
    """The jailer binary could not be found."""


class VersionMismatchError(HostError):
    """Jailer and firecracker are different releases."""


class SandboxRequiredError(HostError):
    """A sandbox was required but the VM cannot be jailed on this host."""


class ChrootBaseError(HostError):
    """The chroot base directory is missing, not writable or on an unsuitable mount."""


class KvmUnavailableError(HostError):
    """/dev/kvm is missing or not readable and writable."""


class CgroupError(HostError):
    """A cgroup directory or file could not be created, written or read."""

    def __init__(
        self,
        message: str,
        *,
        controller: str | None = None,
        path: str | None = None,
        value: str | None = None,
    ) -> None:
        super().__init__(message)
        self.controller = controller
        self.path = path
        self.value = value


class CgroupControllerUnavailableError(CgroupError):
    """A cgroup controller needed for a limit is not available to us."""


class StagingError(IronclawError):
    """Kernel, disks or log files could not be placed inside the jail."""


class NetworkError(IronclawError):
    """A network namespace, tap device or vsock connection could not be set up."""


class AgentError(IronclawError):
    """The guest agent (``ironclaw-agent``) failed, misbehaved or could not be reached."""


class AgentConnectionError(AgentError):
    """The agent could not be reached, or the connection to it was lost."""


class AgentProtocolError(AgentError):
    """The other end sent a malformed, oversized or unexpected message."""


class AgentVersionMismatchError(AgentProtocolError):
    """Host and agent share no protocol version; install a matching agent."""


class AgentRequestError(AgentError):
    """The agent refused or failed a request; ``code`` is its machine-readable reason."""

    def __init__(self, message: str, *, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class TransferIntegrityError(AgentError):
    """A transferred file's size or SHA-256 differs between the two ends."""


class VmError(IronclawError):
    """The VMM, or the jailer launching it, failed."""

    def __init__(self, message: str, *, vm_id: str | None = None) -> None:
        super().__init__(message)
        self.vm_id = vm_id


class JailerError(VmError):
    """The jailer refused to launch the VMM; ``reason`` is its own explanation."""

    def __init__(
        self,
        message: str,
        *,
        vm_id: str | None = None,
        reason: str | None = None,
        exit_code: int | None = None,
        output_tail: str = "",
    ) -> None:
        super().__init__(message, vm_id=vm_id)
        self.reason = reason
        self.exit_code = exit_code
        self.output_tail = output_tail


class VmExitedError(VmError):
    """The VMM exited before it was ready, or unexpectedly."""

    def __init__(
        self,
        message: str,
        *,
        vm_id: str | None = None,
        exit_code: int | None = None,
        output_tail: str = "",
    ) -> None:
        super().__init__(message, vm_id=vm_id)
        self.exit_code = exit_code
        self.output_tail = output_tail


class OutOfMemoryError(VmExitedError):
    """The VMM was killed because its memory cgroup ran out of memory."""


class ApiSocketTimeoutError(VmError):
    """The Firecracker API socket did not appear or answer in time."""


class ApiError(VmError):
    """Firecracker answered an API request with an error status."""

    def __init__(
        self,
        message: str,
        *,
        vm_id: str | None = None,
        status_code: int | None = None,
        fault_message: str | None = None,
    ) -> None:
        super().__init__(message, vm_id=vm_id)
        self.status_code = status_code
        self.fault_message = fault_message


class CleanupError(IronclawError):
    """One or more cleanup steps failed; every step was still attempted."""

    def __init__(self, message: str, failures: Sequence[str] = ()) -> None:
        details = "".join(f"\n  - {f}" for f in failures)
        super().__init__(message + details)
        self.failures = list(failures)


class RegistryError(IronclawError):
    """The VM registry (state directory) is unusable or inconsistent."""


class InstallError(IronclawError):
    """Installing Firecracker failed; nothing was left installed."""


def output_tail(text: str, lines: int = 20) -> str:
    """Return the last ``lines`` lines of ``text`` (for error messages)."""
    return "\n".join(text.rstrip().splitlines()[-lines:])
