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
        if key.startswith("jailer."):
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
