"""Detached VMs: ``ironclaw vm start`` (and the registration of ``ls|stats|logs|stop``).

``vm start`` checks its input against the host, then hands the VM to a supervisor process
of its own (:func:`spawn_supervisor`) and returns once it runs; the other commands find
VMs through the registry (``--state-dir`` / ``$IRONCLAW_STATE_DIR``): ``vm ls`` and
``vm stats`` live in :mod:`.vm_list`, ``vm logs`` and ``vm stop`` in :mod:`.vm_stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..errors import IronclawError
from ..registry import Registry, VmRecord
from ..supervisor import DEFAULT_SPAWN_TIMEOUT_S, spawn_supervisor, stop_detached
from ..vm.inputs import check_vm_inputs
from .common import (
    AppArmorProfileOption,
    BootArgsOption,
    ConfigFileOption,
    ConsoleLimitOption,
    ExitCode,
    IdOption,
    KernelOption,
    MemoryOption,
    NoSeccompOption,
    RateLimitOption,
    RequireSandboxOption,
    RootfsOption,
    SeccompFilterOption,
    SelinuxLabelOption,
    VcpusOption,
    VerboseOption,
    handle_errors,
    hardening_overrides,
    parse_console_limit,
    setup_logging,
    stderr,
)
from .records import JsonOption, open_registry
from .summaries import help_text
from .vm import Probe, build_config

START_HELP = help_text(
    "vm start",
    "vm start always detaches (-d/--detach is implied and accepted, as in `docker run "
    "-d`); use `ironclaw vm run` to run a VM in the foreground. Takes the flags and the "
    "TOML file of `vm run`. Without --kernel it boots the built-in probe guest with "
    "--probe halt, so the VM stays up until `ironclaw vm stop`.\n\n"
    "Prints the VM id on stdout (--json: its registry record) once the VM runs. If the "
    "VM cannot start, nothing is left behind and the error says why.\n\n"
    "Exit status: 0 running, 1 VM error (or the id is in use), 2 usage or configuration "
    "error, 3 host not ready.\n\n"
    "Examples:\n\n"
    "sudo ironclaw vm start -d --id web-1\n\n"
    "sudo ironclaw vm start --kernel vmlinux --rootfs rootfs.ext4 --memory 512 --id web-2\n\n"
    "sudo ironclaw --state-dir /tmp/ic vm start -d --json",
)


# --------------------------------------------------------------------------- vm start


def start(
    vm_id: IdOption = None,
    vcpus: VcpusOption = None,
    memory: MemoryOption = None,
    kernel: KernelOption = None,
    rootfs: RootfsOption = None,
    boot_args: BootArgsOption = None,
    require_sandbox: RequireSandboxOption = False,
    config_file: ConfigFileOption = None,
    rate_limit: RateLimitOption = None,
    seccomp_filter: SeccompFilterOption = None,
    no_seccomp: NoSeccompOption = False,
    apparmor_profile: AppArmorProfileOption = None,
    selinux_label: SelinuxLabelOption = None,
    console_limit: ConsoleLimitOption = None,
    probe: Annotated[
        Probe | None,
        typer.Option(
            "--probe",
            help="Probe guest behaviour (without --kernel): reset|halt|spin. Default: halt.",
        ),
    ] = None,
    detach: Annotated[
        bool,
        typer.Option("--detach", "-d", help="Run detached (implied: vm start always detaches)."),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option("--timeout", help="Seconds to wait for the VM to run.", min=0.1),
    ] = DEFAULT_SPAWN_TIMEOUT_S,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    if verbose:
        setup_logging(True)
    del detach  # always detached; the flag exists for `docker run -d` habits
    overrides: dict[str, Any] = {
        "vm_id": vm_id,
        "vcpu_count": vcpus,
        "memory_mb": memory,
        "kernel_path": None if kernel is None else str(kernel),
        "rootfs_path": None if rootfs is None else str(rootfs),
        "boot_args": boot_args,
        "require_sandbox": True if require_sandbox else None,
    }
    with handle_errors():
        overrides |= hardening_overrides(
            rate_limit=rate_limit, seccomp_filter=seccomp_filter, no_seccomp=no_seccomp,
            apparmor_profile=apparmor_profile, selinux_label=selinux_label,
        )  # fmt: skip
        overrides["console_limit_bytes"] = parse_console_limit(console_limit)
        config, behaviour = build_config(config_file=config_file, overrides=overrides, probe=probe)
        if behaviour is not None and probe is None:
            # The probe guest by default, but one that stays up (reset would end at once).
            config, behaviour = build_config(
                config_file=config_file,
                overrides={**overrides, "vm_id": config.vm_id},
                probe=Probe.halt,
            )
        # Refused here, before a supervisor exists, rather than by the supervisor.
        check_vm_inputs(config)
        registry = open_registry()
        try:
            record = asyncio.run(spawn_supervisor(config, registry, timeout_s=timeout))
            # Until the command has answered, Ctrl-C still means "do not start it".
            if json_output:
                print(json.dumps(record.model_dump(mode="json"), indent=2), flush=True)
            else:
                print(record.vm_id, flush=True)
            # Answered: the VM is the user's now; a late Ctrl-C (up to the process's exit)
            # must not fail the command. The process ends right after this.
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        except KeyboardInterrupt:
            _interrupted_start(registry, config.vm_id)
    _report_started(record)


def _report_started(record: VmRecord) -> None:
    if record.sandboxed is False:
        stderr.print(
            f"[yellow]warning:[/] VM {escape(record.vm_id)} is NOT sandboxed (no jailer): "
            "do not run untrusted code in it"
        )
    stderr.print(
        f"VM {escape(record.vm_id)} running (supervisor pid {record.owner_pid}, VMM pid "
        f"{record.vmm_pid}); `ironclaw vm logs {escape(record.vm_id)}`, "
        f"`ironclaw vm stop {escape(record.vm_id)}`"
    )


def _interrupted_start(registry: Registry, vm_id: str) -> None:
    """Ctrl-C while the supervisor was starting the VM: stop it again, if it got that far."""
    stderr.print(f"[yellow]interrupted:[/] stopping VM {escape(vm_id)}")
    record = registry.get(vm_id)
    if record is not None and record.detached:
        with contextlib.suppress(IronclawError):
            asyncio.run(stop_detached(registry, vm_id))
    if registry.get(vm_id) is not None:
        stderr.print(
            f"[yellow]warning:[/] VM {escape(vm_id)} may still exist: check `ironclaw vm ls`, "
            f"then `ironclaw vm stop {escape(vm_id)}` or `ironclaw gc`"
        )
    raise typer.Exit(int(ExitCode.INTERRUPTED))


__all__ = ["START_HELP", "start"]
