"""ironclaw-orchestrator: run untrusted workloads in Firecracker microVMs, sandboxed by the Jailer.

The public API, importable from here (loaded on first use, so ``import ironclaw_orchestrator``
stays cheap)::

    from ironclaw_orchestrator import VmConfig, start_firecracker

    async with start_firecracker(VmConfig(vm_id="vm1", kernel_path="vmlinux")) as vm:
        await vm.start_instance()
        await vm.wait()

Everything not listed in ``__all__`` (or its submodules' ``__all__``) is internal and may
change without notice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "__version__": "version",  # from the package metadata (importlib.metadata: not free)
    # VMs
    "VmConfig": "vm.config",
    "JailerConfig": "vm.config",
    "FirecrackerProcess": "vm",
    "JailerProcess": "vm.jailer",
    "JailFile": "vm.jailer",
    "start_firecracker": "vm",
    "Starting": "vm.context",
    "stop_firecracker": "vm",
    "start_with_jailer": "vm.jailer",
    "CgroupStats": "vm.cgroups",
    # Host state, clean-up and checks
    "Registry": "registry",
    "VmRecord": "registry",
    "collect_garbage": "gc",
    "GcReport": "gc",
    "run_checks": "doctor",
    "DoctorReport": "doctor",
    "default_run_dir": "paths",
    "default_state_dir": "paths",
    # Errors (the whole tree lives in ironclaw_orchestrator.errors)
    "IronclawError": "errors",
    "ConfigError": "errors",
    "UsageError": "errors",
    "SandboxRequiredError": "errors",
    "HostError": "errors",
    "CleanupError": "errors",
    "OutOfMemoryError": "errors",
    "VmError": "errors",
    "VmExitedError": "errors",
    "RegistryError": "errors",
}

__all__ = [
    "CgroupStats",
    "CleanupError",
    "ConfigError",
    "DoctorReport",
    "FirecrackerProcess",
    "GcReport",
    "HostError",
    "IronclawError",
    "JailFile",
    "JailerConfig",
    "JailerProcess",
    "OutOfMemoryError",
    "Registry",
    "RegistryError",
    "SandboxRequiredError",
    "Starting",
    "UsageError",
    "VmConfig",
    "VmError",
    "VmExitedError",
    "VmRecord",
    "__version__",
    "collect_garbage",
    "default_run_dir",
    "default_state_dir",
    "run_checks",
    "start_firecracker",
    "start_with_jailer",
    "stop_firecracker",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .doctor import DoctorReport, run_checks
    from .errors import (
        CleanupError,
        ConfigError,
        HostError,
        IronclawError,
        OutOfMemoryError,
        RegistryError,
        SandboxRequiredError,
        UsageError,
        VmError,
        VmExitedError,
    )
    from .gc import GcReport, collect_garbage
    from .paths import default_run_dir, default_state_dir
    from .registry import Registry, VmRecord
    from .version import __version__
    from .vm import FirecrackerProcess, start_firecracker, stop_firecracker
    from .vm.cgroups import CgroupStats
    from .vm.config import JailerConfig, VmConfig
    from .vm.context import Starting
    from .vm.jailer import JailerProcess, JailFile, start_with_jailer
