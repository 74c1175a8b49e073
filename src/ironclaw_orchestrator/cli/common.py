"""What every ``ironclaw`` command shares: exit codes, error output, logging, TOML loading.

The CLI is the only part of the project that imports typer or rich. rich is imported when
something is printed through it (:data:`stderr`, :data:`stdout`, a log record), not before:
a command that succeeds quietly (``vm run`` streams the guest console itself) never pays
for it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from ..errors import (
    CleanupError,
    ConfigError,
    HostError,
    InstallError,
    IronclawError,
    OutOfMemoryError,
    UsageError,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.logging import RichHandler


class ExitCode(enum.IntEnum):
    """The stable exit statuses of ``ironclaw`` (documented in the README)."""

    #: Success: the guest exited cleanly (VMM status 0), the host is ready, install done.
    OK = 0
    #: The VM failed: the VMM/jailer did not start, an API call failed, or the VMM exited
    #: with a non-zero status; also any other runtime error (staging, network, registry).
    VM_ERROR = 1
    #: Bad command line, bad flag value or bad configuration (TOML file, VmConfig values).
    USAGE = 2
    #: The host is not ready: KVM, binaries, versions, chroot base, cgroups, root (and
    #: ``ironclaw doctor`` found at least one failed check).
    HOST_NOT_READY = 3
    #: The VMM was OOM-killed because its memory cgroup limit was exhausted.
    OOM_KILLED = 4
    #: ``ironclaw install`` failed (nothing was installed).
    INSTALL_FAILED = 5
    #: The VM ended but cleanup left resources behind (``ironclaw gc`` removes them).
    CLEANUP_FAILED = 6
    #: Stopped by SIGINT (Ctrl-C); the VM was stopped and cleaned up first.
    INTERRUPTED = 130
    #: ``vm run``, ``vm logs -f``: stdout was closed (the reader of a pipe exited; 128 +
    #: SIGPIPE, as a process killed by it); ``vm run`` stopped and cleaned up the VM first.
    OUTPUT_CLOSED = 141
    #: Stopped by SIGTERM; the VM was stopped and cleaned up first.
    TERMINATED = 143


#: ``(exception class, exit code)`` in lookup order: the first match wins.
ERROR_EXIT_CODES: tuple[tuple[type[IronclawError], ExitCode], ...] = (
    (OutOfMemoryError, ExitCode.OOM_KILLED),
    (ConfigError, ExitCode.USAGE),
    (UsageError, ExitCode.USAGE),
    (HostError, ExitCode.HOST_NOT_READY),
    (InstallError, ExitCode.INSTALL_FAILED),
    (CleanupError, ExitCode.CLEANUP_FAILED),
    (IronclawError, ExitCode.VM_ERROR),
)


class LazyConsole:
    """A rich ``Console`` made (and rich imported) on first use.

    ``print`` and ``is_terminal`` are forwarded, any other attribute too; pass
    :meth:`get` where rich wants the console itself (``Live``, ``Progress``).
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._console: Console | None = None

    def get(self) -> Console:
        """The console (made now if this is the first use)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kwargs)
        return self._console

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.get().print(*objects, **kwargs)

    @property
    def is_terminal(self) -> bool:
        return self.get().is_terminal

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.get(), name)


stderr = LazyConsole(stderr=True, highlight=False, soft_wrap=True)
stdout = LazyConsole(highlight=False, soft_wrap=True)

VerboseOption = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Debug logging on stderr."),
]


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an error raised by the library."""
    for cls, code in ERROR_EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return ExitCode.VM_ERROR


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> NoReturn:
    """Print one red error message (no traceback) and exit with ``code``."""
    from rich.markup import escape

    stderr.print(f"[bold red]error:[/] [red]{escape(message)}[/]")
    raise typer.Exit(int(code))


@contextmanager
def handle_errors() -> Iterator[None]:
    """Turn library errors into a red message and their exit code."""
    try:
        yield
    except IronclawError as exc:
        logging.getLogger("ironclaw_orchestrator").debug("error details", exc_info=exc)
        fail(str(exc), exit_code_for(exc))


class _LazyRichHandler(logging.Handler):
    """Formats records with rich's ``RichHandler``, made when the first record arrives."""

    _ironclaw = True

    def __init__(self, *, show_time: bool) -> None:
        super().__init__()
        self._show_time = show_time
        self._rich: RichHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._rich is None:
            from rich.logging import RichHandler

            self._rich = RichHandler(
                console=stderr.get(), show_path=False, show_time=self._show_time, markup=False
            )
        self._rich.emit(record)


def setup_logging(verbose: bool) -> None:
    """Log to stderr: WARNING and up by default, everything of ours with ``-v``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_ironclaw", False):
            root.removeHandler(handler)
    root.addHandler(_LazyRichHandler(show_time=verbose))
    root.setLevel(logging.WARNING)
    ours = logging.getLogger("ironclaw_orchestrator")
    ours.setLevel(logging.DEBUG if verbose else logging.NOTSET)


# --------------------------------------------------------------------------- TOML


def config_problems(exc: ConfigError, prefix: str = "") -> list[str]:
    """The ``  key: message`` lines of a ``config_error`` message, keys prefixed."""
    lines = str(exc).splitlines()[1:]
    return [f"  {prefix}{line.strip()}" if line.startswith("  ") else line for line in lines]


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; problems are ``ConfigError`` naming the file."""
    import tomllib  # only --config needs it

    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
            f"offset {exc.start}): TOML files must be UTF-8"
        ) from None


def merge_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with every override that is not ``None`` applied on top (flags win).

    A key ``"jailer.<field>"`` overrides a field of the ``[jailer]`` table.
    """
    merged = dict(data)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            # A table given partly by flags (e.g. one bucket of a rate limit): merge into it.
            merged[key] = {**merged[key], **value}
        elif key.startswith("jailer."):
            table = merged.get("jailer")
            jailer = dict(table) if isinstance(table, Mapping) else {}
            jailer[key.removeprefix("jailer.")] = value
            merged["jailer"] = jailer
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------- VM options
# Declared once, shared by `vm run` and `vm start`.
IdOption = Annotated[str | None, typer.Option("--id", help="VM id: 1-64 of A-Z a-z 0-9 '-'.")]
VcpusOption = Annotated[int | None, typer.Option("--vcpus", help="Number of vCPUs.")]
MemoryOption = Annotated[int | None, typer.Option("--memory", help="Guest memory in MiB.")]
KernelOption = Annotated[
    Path | None, typer.Option("--kernel", help="Guest kernel (default: the probe guest).")
]
RootfsOption = Annotated[Path | None, typer.Option("--rootfs", help="Root drive image.")]
BootArgsOption = Annotated[str | None, typer.Option("--boot-args", help="Kernel command line.")]
RequireSandboxOption = Annotated[
    bool, typer.Option("--require-sandbox", help="Refuse to run unless jailed.")
]
ConfigFileOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file with VmConfig keys.")
]

# Rate limits and confinement (shared by `vm run` and `vm start`).
RATE_LIMIT_HELP = (
    "Rate limit, repeatable: drive|net-rx|net-tx.bandwidth|ops=SIZE/TIME[,burst=N] "
    "(Firecracker token buckets, e.g. drive.bandwidth=10MiB/1s, net-tx.ops=1000/1s) or "
    "vsock.bytes=N (bytes/s) / vsock.connections=N (per second)."
)
RateLimitOption = Annotated[
    list[str] | None,
    typer.Option("--rate-limit", help=RATE_LIMIT_HELP, show_default=False, metavar="KEY=SPEC"),
]
SeccompFilterOption = Annotated[
    Path | None,
    typer.Option("--seccomp-filter", help="Custom seccomp filter (compiled by seccompiler-bin)."),
]
NoSeccompOption = Annotated[
    bool,
    typer.Option("--no-seccomp", help="Run the VMM without seccomp (debugging; refused in "
                 "production mode)."),
]  # fmt: skip
AppArmorProfileOption = Annotated[
    str | None,
    typer.Option("--apparmor-profile", help="Start under this AppArmor profile (must be loaded)."),
]
SelinuxLabelOption = Annotated[
    str | None,
    typer.Option("--selinux-label", help="Start with this SELinux context (SELinux hosts)."),
]

ConsoleLimitOption = Annotated[
    str | None,
    typer.Option(
        "--console-limit",
        help="Bytes of console output (serial + firecracker's log) kept for the VM, e.g. 4MiB; "
        "older output is dropped (console_limit_bytes).",
        metavar="SIZE",
        show_default=False,
    ),
]


def parse_console_limit(value: str | None) -> int | None:
    """``--console-limit`` as bytes (``ConfigError`` naming the flag); ``None`` if unset."""
    from ..vm.ratelimit import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"--console-limit {value!r}: {exc}") from None


_RATE_DEVICES = {"drive": "drive_rate_limit", "net-rx": "net_rx_rate_limit",
                 "net-tx": "net_tx_rate_limit"}  # fmt: skip
_VSOCK_KEYS = {"bytes": "bytes_per_s", "connections": "connections_per_s"}


def parse_rate_limits(specs: list[str]) -> dict[str, dict[str, Any]]:
    """``--rate-limit`` values as ``VmConfig`` tables (``ConfigError`` naming the bad one)."""
    from ..vm.ratelimit import TokenBucket, parse_size

    tables: dict[str, dict[str, Any]] = {}
    for spec in specs:
        key, eq, value = spec.partition("=")
        device, _, bucket = key.strip().partition(".")
        try:
            if not eq:
                raise ValueError("expected KEY=VALUE")
            if device == "vsock" and bucket in _VSOCK_KEYS:
                number = float(value) if bucket == "connections" else parse_size(value)
                tables.setdefault("vsock_rate_limit", {})[_VSOCK_KEYS[bucket]] = number
            elif device in _RATE_DEVICES and bucket in ("bandwidth", "ops"):
                parsed = TokenBucket.parse(value).model_dump(exclude_none=True)
                tables.setdefault(_RATE_DEVICES[device], {})[bucket] = parsed
            else:
                raise ValueError(
                    "unknown key: use drive|net-rx|net-tx.bandwidth|ops or vsock.bytes|connections"
                )
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"--rate-limit {spec!r}: {exc}") from None
    return tables


def hardening_overrides(
    *,
    rate_limit: list[str] | None,
    seccomp_filter: Path | None,
    no_seccomp: bool,
    apparmor_profile: str | None,
    selinux_label: str | None,
) -> dict[str, Any]:
    """Overrides (for :func:`merge_overrides`) from the rate-limit and confinement flags."""
    overrides: dict[str, Any] = dict(parse_rate_limits(rate_limit or []))
    overrides.update({
        "jailer.seccomp_filter": None if seccomp_filter is None else str(seccomp_filter),
        "jailer.no_seccomp": True if no_seccomp else None,
        "jailer.apparmor_profile": apparmor_profile,
        "jailer.selinux_label": selinux_label,
    })  # fmt: skip
    return overrides
