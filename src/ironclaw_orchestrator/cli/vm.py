"""``ironclaw vm run``: boot one microVM, stream its console, stop and clean up.

Configuration comes from, in increasing precedence: ``VmConfig`` defaults, the TOML file
(``--config``: ``VmConfig`` keys at top level, ``JailerConfig`` keys in a ``[jailer]`` table),
then the flags. Without a kernel (neither ``--kernel`` nor ``kernel_path`` in the file) the
built-in probe guest is booted, with no root drive and 128 MiB unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError, IronclawError
from ..vm import FirecrackerProcess, start_firecracker
from ..vm.config import VmConfig
from ..vm.consoleread import ConsoleFollower
from ..vm.probe import PROBE_BOOT_ARGS, ProbeBehaviour, probe_kernel_path
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
    config_problems,
    fail,
    handle_errors,
    hardening_overrides,
    load_toml,
    merge_overrides,
    parse_console_limit,
    setup_logging,
    stderr,
)
from .summaries import help_text

log = logging.getLogger("ironclaw_orchestrator.cli")

#: Memory of the probe guest when neither the flags nor the file set ``memory_mb``.
PROBE_MEMORY_MIB = 128
#: How often the console file is polled for new output.
CONSOLE_POLL_S = 0.02


class Probe(enum.StrEnum):
    reset = "reset"
    halt = "halt"
    spin = "spin"


RUN_HELP = help_text(
    "vm run",
    "The VM is jailed unless --no-jailer is given (or the jailer cannot run here and "
    "no sandbox is required, in which case a warning is logged). Without --kernel it "
    "boots the built-in probe guest (--probe reset: prints its ready line and exits; "
    "halt/spin: runs until interrupted). Ctrl-C or SIGTERM stops the VM and cleans "
    "everything up (exit 130 / 143).\n\n"
    "Exit status: 0 guest exited cleanly, 1 VM error (or the VMM exited non-zero), 2 "
    "usage or configuration error, 3 host not ready, 4 OOM-killed, 6 cleanup failed, "
    "130 SIGINT, 141 stdout closed (the VM was stopped), 143 SIGTERM.\n\n"
    "The TOML file holds VmConfig keys at top level and JailerConfig keys in a "
    "\\[jailer] table; flags override it:\n\n"
    'vm_id = "web-1"\n\n'
    "memory_mb = 256\n\n"
    "\\[jailer]\n\n"
    'chroot_base_dir = "/var/jail"\n\n'
    "Examples:\n\n"
    "sudo ironclaw vm run\n\n"
    "sudo ironclaw vm run --probe halt --stats\n\n"
    "sudo ironclaw vm run --kernel vmlinux --rootfs rootfs.ext4 --vcpus 2 --memory "
    "512\n\n"
    "sudo ironclaw vm run --config vm.toml --id web-2\n\n"
    "ironclaw vm run --no-jailer",
)


def build_config(
    *,
    config_file: Path | None,
    overrides: dict[str, Any],
    probe: Probe | None,
) -> tuple[VmConfig, ProbeBehaviour | None]:
    """The ``VmConfig`` from file + flags, and the probe behaviour if the probe is booted.

    The file and the flags are validated together, after the flags were applied (a flag
    overrides a bad value in the file). Raises ``ConfigError`` naming every bad key
    (``jailer.<key>`` for the ``[jailer]`` table) and the file.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        data = load_toml(config_file)
        if "jailer" in data and not isinstance(data["jailer"], dict):
            raise ConfigError(
                f"invalid config file {config_file}:\n  jailer: must be a table ([jailer])"
            )
    merged = merge_overrides(data, overrides)
    behaviour: ProbeBehaviour | None = None
    if "kernel_path" not in merged:
        behaviour = ProbeBehaviour(probe.value if probe is not None else "reset")
        merged["kernel_path"] = str(probe_kernel_path(behaviour))
        merged.setdefault("rootfs_path", None)
        merged.setdefault("memory_mb", PROBE_MEMORY_MIB)
        merged.setdefault("boot_args", PROBE_BOOT_ARGS)
    elif probe is not None:
        raise ConfigError("--probe boots the built-in probe guest: it cannot be used with a kernel")
    else:
        merged.setdefault("rootfs_path", None)
    merged.setdefault("vm_id", f"ironclaw-run-{secrets.token_hex(4)}")
    try:
        return VmConfig(**merged), behaviour
    except ConfigError as exc:
        source = "flags" if config_file is None else f"config file {config_file} and flags"
        problems = "\n".join(config_problems(exc))
        raise ConfigError(f"invalid configuration (from {source}):\n{problems}") from None


def _discard_output(out: Any) -> None:
    """Point ``out``'s descriptor at /dev/null, so that what is still buffered is dropped
    instead of failing again at exit (Python's "Note on SIGPIPE")."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _Follower:
    """Copies a growing console to a binary stream, like ``tail -F`` (across rotations)."""

    def __init__(self, path: Path, out: Any, on_closed: Callable[[], None] = lambda: None) -> None:
        self.path = path
        self.out = out
        self._reader = ConsoleFollower(path)
        self._on_closed = on_closed
        #: The reader of ``out`` went away (EPIPE): from then on output is read and dropped.
        self.closed = False

    def drain(self) -> int:
        """Copy what is new (up to 1 MiB, so that a flood cannot starve the event loop);
        return the number of bytes read."""
        chunk = self._reader.read()
        if chunk and not self.closed:
            try:
                self.out.write(chunk)
                self.out.flush()
            except BrokenPipeError:
                self.closed = True
                _discard_output(self.out)
                self._on_closed()
        return len(chunk)

    def drain_all(self) -> int:
        """Copy everything there is now."""
        total = 0
        while copied := self.drain():
            total += copied
        return total

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(0 if self.drain() else CONSOLE_POLL_S)

    def close(self) -> None:
        self._reader.close()


async def _print_stats(vm: FirecrackerProcess) -> None:
    from rich.table import Table

    try:
        stats = await vm.stats()
    except IronclawError as exc:
        stderr.print(f"[yellow]stats unavailable:[/] {exc}")
        return
    table = Table(title=f"VM {vm.vm_id} stats")
    table.add_column("counter")
    table.add_column("value", justify="right")
    for name, value in vars(stats).items():
        if name == "io":
            continue
        table.add_row(name, "n/a" if value is None else f"{value:,}")
    for device, io in (stats.io or {}).items():
        table.add_row(
            f"io {device}",
            f"read {io.read_bytes:,} B / {io.read_ios:,} ops, "
            f"write {io.write_bytes:,} B / {io.write_ios:,} ops",
        )
    stderr.print(table)


async def run_vm(config: VmConfig, *, force_unjailed: bool, stats: bool) -> ExitCode:
    """Start, boot, stream, stop. Returns the exit code; library errors propagate after the
    VM was stopped and cleaned up."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals: list[int] = []

    def on_signal(sig: int) -> None:
        if signals:
            log.warning("already stopping VM %s", config.vm_id)
            return
        signals.append(sig)
        stop_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    def interrupted() -> ExitCode:
        if signals[0] == signal.SIGPIPE:
            stderr.print(f"[yellow]stdout closed:[/] stopping VM {config.vm_id} and cleaning up")
            return ExitCode.OUTPUT_CLOSED
        name = signal.Signals(signals[0]).name
        stderr.print(f"[yellow]{name}:[/] stopping VM {config.vm_id} and cleaning up")
        return ExitCode.INTERRUPTED if signals[0] == signal.SIGINT else ExitCode.TERMINATED

    vm: FirecrackerProcess | None = None
    follower: _Follower | None = None
    tail: asyncio.Task[None] | None = None
    try:
        start = asyncio.ensure_future(
            start_firecracker(config, use_jailer=False if force_unjailed else None)
        )
        stop_wait = asyncio.ensure_future(stop_requested.wait())
        await asyncio.wait({start, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            # Cancelling makes the library undo everything it made so far.
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            return interrupted()
        stop_wait.cancel()
        vm = start.result()
        if not vm.is_sandboxed:
            log.warning("VM %s is NOT sandboxed (no jailer): do not run untrusted code", vm.vm_id)
        log.info("VM %s started (pid %d), console %s", vm.vm_id, vm.pid, vm.console_path)
        # A closed stdout (the reader of a pipe exited) stops the VM, as SIGPIPE would.
        follower = _Follower(
            vm.console_path, sys.stdout.buffer, on_closed=lambda: on_signal(signal.SIGPIPE)
        )
        tail = asyncio.ensure_future(follower.follow())
        await vm.start_instance()
        waiter = asyncio.ensure_future(vm.wait())
        stop_wait = asyncio.ensure_future(stop_requested.wait())
        await asyncio.wait({waiter, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiter
            if stats:
                await _print_stats(vm)
            return interrupted()
        stop_wait.cancel()
        try:
            code = waiter.result()
        finally:
            if stats:
                await _print_stats(vm)
        if code == 0:
            return ExitCode.OK
        stderr.print(
            f"[bold red]error:[/] [red]VM {vm.vm_id}: the VMM exited with status {code}[/]"
        )
        return ExitCode.VM_ERROR
    finally:
        try:
            if tail is not None:
                tail.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tail
            if follower is not None:
                try:
                    follower.drain_all()
                finally:
                    follower.close()
        finally:
            # Whatever the console copy raised, the VM is stopped and cleaned up.
            if vm is not None:
                await vm.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def run(
    vm_id: IdOption = None,
    vcpus: VcpusOption = None,
    memory: MemoryOption = None,
    kernel: KernelOption = None,
    rootfs: RootfsOption = None,
    boot_args: BootArgsOption = None,
    no_jailer: Annotated[
        bool, typer.Option("--no-jailer", help="Run without the jailer (INSECURE, development).")
    ] = False,
    require_sandbox: RequireSandboxOption = False,
    config_file: ConfigFileOption = None,
    rate_limit: RateLimitOption = None,
    seccomp_filter: SeccompFilterOption = None,
    no_seccomp: NoSeccompOption = False,
    apparmor_profile: AppArmorProfileOption = None,
    selinux_label: SelinuxLabelOption = None,
    console_limit: ConsoleLimitOption = None,
    stats: Annotated[
        bool, typer.Option("--stats", help="Print the VM's cgroup stats (stderr) at the end.")
    ] = False,
    probe: Annotated[
        Probe | None,
        typer.Option("--probe", help="Probe guest behaviour (without --kernel): reset|halt|spin."),
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    if verbose:
        setup_logging(True)
    if no_jailer and require_sandbox:
        fail("--no-jailer and --require-sandbox contradict each other: pick one")
    overrides: dict[str, Any] = {
        "vm_id": vm_id,
        "vcpu_count": vcpus,
        "memory_mb": memory,
        "kernel_path": None if kernel is None else str(kernel),
        "rootfs_path": None if rootfs is None else str(rootfs),
        "boot_args": boot_args,
        # --no-jailer does not lift a required sandbox (file or IRONCLAW_REQUIRE_SANDBOX):
        # start_firecracker(use_jailer=False) refuses it with SandboxRequiredError instead.
        "require_sandbox": True if require_sandbox else None,
    }
    with handle_errors():
        overrides |= hardening_overrides(
            rate_limit=rate_limit, seccomp_filter=seccomp_filter, no_seccomp=no_seccomp,
            apparmor_profile=apparmor_profile, selinux_label=selinux_label,
        )  # fmt: skip
        overrides["console_limit_bytes"] = parse_console_limit(console_limit)
        config, _ = build_config(config_file=config_file, overrides=overrides, probe=probe)
        try:
            code = asyncio.run(run_vm(config, force_unjailed=no_jailer, stats=stats))
        except KeyboardInterrupt:  # Ctrl-C before the signal handlers were installed
            code = ExitCode.INTERRUPTED
    raise typer.Exit(int(code))


__all__ = ["RUN_HELP", "build_config", "run", "run_vm"]
