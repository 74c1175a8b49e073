"""The host agent's logic, without HTTP: admit, start, list, stop and collect VMs.

The agent owns nothing the registry does not also hold. Each started VM belongs to a
supervisor process of its own (:func:`~ironclaw_orchestrator.supervisor.spawn_supervisor`),
so the agent can be restarted or upgraded while VMs run: on start-up it lists the registry,
re-adopts every VM whose supervisor lives and garbage-collects the ones whose owner died.
VMs defined but not started (``POST /v1/vms`` without ``?start=true``) are config files in
``<state dir>/defined/``, so they survive a restart as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .. import procfs
from ..detach import (
    CONFIG_PREFIX,
    SPAWN_LOG_PREFIX,
    list_vms,
    reap_supervisors,
    spawn_supervisor,
    stop_detached,
)
from ..errors import ConfigError, RegistryError
from ..gc import GcReport, collect_garbage
from ..registry import Registry, VmRecord, check_vm_id
from ..vm import VmConfig
from ..vm.cgroups import VmCgroups
from ..vm.consoleread import dropped_bytes
from .admission import Admission, Capacity, Usage
from .errors import NotFoundError, PolicyError
from .settings import AgentSettings

__all__ = ["HOST_OWNED_JAILER_KEYS", "HostAgent", "agent_version"]

log = logging.getLogger(__name__)

#: Jailer keys the operator sets for the host (flags of `ironclaw serve`), never a request:
#: they name host binaries, host directories, host ids and host cgroups.
HOST_OWNED_JAILER_KEYS = frozenset(
    {
        "jailer_binary",
        "exec_file",
        "chroot_base_dir",
        "uid",
        "gid",
        "parent_cgroup",
        "netns",
        "jailer_id",
        "cgroup_version",
        "image_dirs",
    }
)
#: Top-level keys a request may not set: a host veth is the operator's choice.
HOST_OWNED_KEYS = frozenset({"uplink_subnet", "image_dirs"})
DEFINED_DIR = "defined"
#: A supervisor reads (and deletes) its config file within a second of being spawned; one
#: older than this was never picked up (the agent died between writing it and the spawn).
SPAWN_FILE_GRACE_S = 15.0


def agent_version() -> str:
    try:
        return version("ironclaw-orchestrator")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


class HostAgent:
    """One host's VMs, for the HTTP layer (:mod:`.app`) to expose."""

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.registry = Registry(settings.state_dir)
        self.capacity = Capacity.of_host(settings)
        self.admission = Admission(self.registry, self.capacity, settings.max_starting)
        self.defined_dir = settings.state_dir / DEFINED_DIR
        self.started_at = datetime.now(UTC)
        self.adopted: list[str] = []
        self.collected: list[str] = []
        self.hostname = socket.gethostname()

    # ------------------------------------------------------------------ start-up

    async def startup(self) -> None:
        """Re-adopt every VM whose supervisor lives; gc the ones whose owner died."""
        self.defined_dir.mkdir(mode=0o700, exist_ok=True)
        self.sweep_spawn_files()
        statuses = list_vms(self.registry)
        self.adopted = [s.record.vm_id for s in statuses if s.owner_alive]
        dead = [s.record.vm_id for s in statuses if not s.owner_alive]
        if dead:
            report = await asyncio.to_thread(self._collect, dead)
            self.collected = [vm_id for vm_id in dead if self.registry.get(vm_id) is None]
            if not report.ok:
                log.error("gc of dead VMs left errors: %s", json.dumps(report.to_dict()))
        log.info(
            "adopted %d running VM(s), collected %d dead one(s)",
            len(self.adopted),
            len(self.collected),
        )

    def sweep_spawn_files(self, grace_s: float = SPAWN_FILE_GRACE_S) -> list[str]:
        """Remove hand-over files of starts that never reached a supervisor.

        An agent killed between writing a VM's config file and spawning its supervisor
        leaves the file (and possibly the spawn log) behind; gc scoped to VM ids does not
        see them, as they name no VM yet. ``.config-<token>.json`` and ``.spawn-<token>.tmp``
        are removed once older than ``grace_s`` and no live supervisor names that config
        file in its argv.
        """
        names = [p.name for p in self.settings.state_dir.iterdir()]
        tokens = {}
        for name in names:
            if name.startswith(CONFIG_PREFIX) and name.endswith(".json"):
                tokens[name] = name[len(CONFIG_PREFIX) : -len(".json")]
            elif name.startswith(SPAWN_LOG_PREFIX) and name.endswith(".tmp"):
                tokens[name] = name[len(SPAWN_LOG_PREFIX) : -len(".tmp")]
        if not tokens:
            return []
        in_use = {
            arg[len(CONFIG_PREFIX) : -len(".json")]
            for pid in procfs.all_pids()
            for arg in procfs.read_cmdline(pid)
            if arg.startswith(CONFIG_PREFIX) and arg.endswith(".json")
        }
        removed = []
        now = time.time()
        for name, token in tokens.items():
            path = self.settings.state_dir / name
            if token in in_use or path.is_symlink():
                continue
            try:
                if now - path.stat().st_mtime < grace_s:
                    continue
                path.unlink()
            except OSError:
                continue
            removed.append(name)
            log.warning("removed %s: a start that never reached its supervisor", path)
        return removed

    def _collect(self, vm_ids: list[str] | None) -> GcReport:
        return collect_garbage(
            self.registry,
            vm_ids=vm_ids,
            chroot_bases=(self.settings.chroot_base,),
            run_root=self.settings.run_dir,
            orphan_grace_s=0.0 if vm_ids is not None else 30.0,
        )

    # ------------------------------------------------------------------ configs

    def prepare_config(self, data: object) -> VmConfig:
        """Validate a request body into the ``VmConfig`` this host will run.

        Host-owned keys and unjailed VMs on a host that requires the sandbox are refused
        first (``PolicyError``), then the library validates (``ConfigError`` naming each bad
        key), then images outside the image directories are refused (``PolicyError``). A
        missing ``vm_id`` gets a fresh one.
        """
        if not isinstance(data, dict):
            raise ConfigError("invalid VmConfig: the request body must be a JSON object")
        body = dict(data)
        for key in sorted(HOST_OWNED_KEYS & body.keys()):
            raise PolicyError(f"{key} is set by the host agent's operator, not by a request")
        jailer = body.get("jailer")
        if isinstance(jailer, dict):
            owned = sorted(HOST_OWNED_JAILER_KEYS & jailer.keys())
            if owned:
                raise PolicyError(
                    f"jailer.{owned[0]} is set by the host agent (ironclaw serve flags), not by "
                    f"a request; leave out: {', '.join('jailer.' + k for k in owned)}"
                )
        body.setdefault("vm_id", f"vm-{uuid.uuid4().hex[:12]}")
        if self.settings.require_sandbox:
            if body.get("require_sandbox") is False:
                raise PolicyError(
                    "this host agent runs jailed VMs only (require_sandbox cannot be false here)"
                )
            body["require_sandbox"] = True
        # The library confines kernel/rootfs to these again when it stages them.
        body["image_dirs"] = [str(d) for d in self.settings.image_dirs]
        config = VmConfig(**body)  # ConfigError with the library's messages
        jailer_cfg = (config.jailer.model_dump(exclude_unset=True) if config.jailer else {}) | {
            "chroot_base_dir": str(self.settings.chroot_base)
        }
        config = VmConfig(**{**config.model_dump(exclude_unset=True), "jailer": jailer_cfg})
        for key in ("kernel_path", "rootfs_path"):
            value = getattr(config, key)
            if value is not None:
                self._check_image(key, value)
        return config

    def _check_image(self, key: str, value: str) -> None:
        if not os.path.isabs(value):
            raise ConfigError(f"invalid VmConfig:\n  {key}: {value!r} must be an absolute path")
        real = Path(os.path.realpath(value))
        if not any(real.is_relative_to(d) for d in self.settings.image_dirs):
            allowed = ", ".join(str(d) for d in self.settings.image_dirs)
            raise PolicyError(
                f"{key} {value!r} is not in an image directory of this host ({allowed}); "
                "put the image there (the operator sets them with --image-dir)"
            )

    def _defined_path(self, vm_id: str) -> Path:
        return self.defined_dir / f"{check_vm_id(vm_id)}.json"

    # ------------------------------------------------------------------ create / start

    async def create(self, data: object, *, start: bool) -> dict[str, Any]:
        """Define a VM (``start=False``) or start it now; returns its description."""
        config = self.prepare_config(data)
        vm_id = config.vm_id
        if self.registry.get(vm_id) is not None or self._defined_path(vm_id).exists():
            raise RegistryError(
                f"VM id {vm_id} is in use on this host: pick another id or DELETE /v1/vms/{vm_id}"
            )
        if not start:
            self._write_defined(config)
            return self._defined_dict(config)
        return await self._start(config)

    async def start_defined(self, vm_id: str) -> dict[str, Any]:
        path = self._defined_path(vm_id)
        try:
            config = VmConfig(**json.loads(path.read_bytes()))
        except FileNotFoundError:
            raise NotFoundError(self._no_vm(vm_id, "defined ")) from None
        result = await self._start(config)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return result

    async def _start(self, config: VmConfig) -> dict[str, Any]:
        want = Usage(config.vcpu_count, config.memory_mb)
        with self.admission.reserve(config.vm_id, want):
            record = await spawn_supervisor(config, self.registry)
        return self._record_dict(record)

    def _write_defined(self, config: VmConfig) -> None:
        path = self._defined_path(config.vm_id)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(config.model_dump_json(exclude_unset=True).encode())
        try:
            os.link(tmp, path)  # fails if the id was defined meanwhile
        except FileExistsError:
            raise RegistryError(f"VM id {config.vm_id} is in use: it is already defined") from None
        finally:
            tmp.unlink()

    # ------------------------------------------------------------------ read

    def _no_vm(self, vm_id: str, what: str = "") -> str:
        return f"there is no {what}VM {vm_id!r} on this host ({self.hostname}): see GET /v1/vms"

    def _record_dict(self, record: VmRecord) -> dict[str, Any]:
        status: str = "stale" if not record.owner_alive() else record.state
        if status == "running" and not record.vmm_alive():
            status = "exited"
        return {
            "vm_id": record.vm_id,
            "status": status,
            "sandboxed": record.sandboxed,
            "vcpus": record.vcpus,
            "memory_mb": record.memory_mb,
            "created_at": record.created_at.isoformat(),
            "uptime_s": round((datetime.now(UTC) - record.created_at).total_seconds(), 3),
            "vmm_pid": record.vmm_pid,
            "supervisor_pid": record.owner_pid,
            "detached": record.detached,
            "host": self.hostname,
        }

    def _defined_dict(self, config: VmConfig) -> dict[str, Any]:
        return {
            "vm_id": config.vm_id,
            "status": "defined",
            "vcpus": config.vcpu_count,
            "memory_mb": config.memory_mb,
            "host": self.hostname,
        }

    def list(self) -> list[dict[str, Any]]:
        out = {s.record.vm_id: self._record_dict(s.record) for s in list_vms(self.registry)}
        for path in sorted(self.defined_dir.glob("*.json")):
            vm_id = path.stem
            if vm_id not in out:
                with contextlib.suppress(OSError, ValueError, ConfigError):
                    out[vm_id] = self._defined_dict(VmConfig(**json.loads(path.read_bytes())))
        return [out[k] for k in sorted(out)]

    def record(self, vm_id: str) -> VmRecord:
        record = self.registry.get(check_vm_id(vm_id))
        if record is None:
            raise NotFoundError(self._no_vm(vm_id))
        return record

    def get(self, vm_id: str) -> dict[str, Any]:
        record = self.registry.get(check_vm_id(vm_id))
        if record is not None:
            return self._record_dict(record)
        path = self._defined_path(vm_id)
        try:
            return self._defined_dict(VmConfig(**json.loads(path.read_bytes())))
        except FileNotFoundError:
            raise NotFoundError(self._no_vm(vm_id)) from None

    async def stats(self, vm_id: str) -> dict[str, Any]:
        record = self.record(vm_id)
        if record.cgroups is None:
            from ..errors import UsageError

            why = "it runs unjailed" if record.sandboxed is False else "it is still starting"
            raise UsageError(f"VM {vm_id} has no cgroups to read: {why}")
        cgroups = record.cgroups
        stats = await asyncio.to_thread(lambda: VmCgroups.from_dict(cgroups).stats())
        limit = record.memory_limit_mb
        return {
            "vm_id": vm_id,
            "time": datetime.now(UTC).isoformat(),
            "memory_limit_bytes": None if limit is None else limit * 2**20,
            **dataclasses.asdict(stats),
            # Console bytes dropped to stay within console_limit_bytes (from the files).
            "console_dropped_bytes": (
                None if record.console_path is None else dropped_bytes(record.console_path)
            ),
        }

    def log_path(self, vm_id: str, source: str) -> Path:
        record = self.record(vm_id)
        path = record.log_path if source == "supervisor" else record.console_path
        if path is None:
            raise NotFoundError(f"VM {vm_id} has no {source} log (yet)")
        return path

    # ------------------------------------------------------------------ stop / gc

    async def stop(self, vm_id: str) -> dict[str, Any]:
        """Stop a running VM (its supervisor cleans up) or forget a defined one."""
        check_vm_id(vm_id)
        if self.registry.get(vm_id) is None:
            try:
                self._defined_path(vm_id).unlink()
            except FileNotFoundError:
                raise NotFoundError(self._no_vm(vm_id)) from None
            return {"vm_id": vm_id, "status": "deleted"}
        report = await stop_detached(self.registry, vm_id)
        with contextlib.suppress(FileNotFoundError):
            self._defined_path(vm_id).unlink()
        return {
            "vm_id": vm_id,
            "status": "stopped",
            "gc": None if report is None else report.to_dict(),
        }

    async def gc(self, *, orphans: bool = False) -> dict[str, Any]:
        """Collect VMs of this registry whose owner died; ``orphans`` also sweeps leftovers.

        The orphan sweep is limited to this agent's chroot base, run directory and state
        directory, but network namespaces are host-wide: use it on a host where this agent
        is the only user of the library.
        """
        reap_supervisors()
        ids = None if orphans else [s.record.vm_id for s in list_vms(self.registry)]
        if ids == []:
            return {"ok": True, "actions": [], "live": []}
        report = await asyncio.to_thread(self._collect, ids)
        result: dict[str, Any] = report.to_dict()
        return result

    # ------------------------------------------------------------------ host

    def health(self) -> str:
        if self.admission.draining:
            return "draining"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "unhealthy: /dev/kvm is not accessible"
        return "ok"

    def host_info(self) -> dict[str, Any]:
        cap = self.capacity
        used = self.admission.committed()
        records = self.registry.list()
        return {
            "hostname": self.hostname,
            "version": agent_version(),
            "health": self.health(),
            "draining": self.admission.draining,
            "labels": dict(self.settings.labels),
            "capacity": {
                "vcpus": cap.vcpus,
                "memory_mb": cap.memory_mb,
                "cpu_overcommit": cap.cpu_overcommit,
                "memory_overcommit": cap.memory_overcommit,
                "admit_vcpus": cap.admit_vcpus,
                "admit_memory_mb": cap.admit_memory_mb,
                "max_starting": self.admission.max_starting,
            },
            "committed": {"vcpus": used.vcpus, "memory_mb": used.memory_mb},
            "starting": len(self.admission.starting),
            "vms": len(records),
            "started_at": self.started_at.isoformat(),
            "uptime_s": round(time.time() - self.started_at.timestamp(), 3),
            "adopted": list(self.adopted),
            "collected": list(self.collected),
        }

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting and wait (up to ``timeout_s``) for starts in flight to finish."""
        self.admission.draining = True
        deadline = time.monotonic() + timeout_s
        while self.admission.starting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
