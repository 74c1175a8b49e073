"""The probe guest: a tiny x86_64 ELF kernel that Firecracker boots, built by this module.

Linux guests need a kernel built with options some hosts lack, and some hosts (nested
hypervisors) cannot boot Linux at all. The probe is what the project boots instead when it
only needs *a* guest: to check that a VMM really started, to make it use memory (cgroup
limit and OOM tests) or CPU (quota tests), and to make it exit on its own.

It is generated from this package's source, never committed as a binary and never
assembled by an external tool: every instruction (:mod:`.program`) is written as its
machine-code bytes next to the assembly they encode, and the assembler of :mod:`.asm`
resolves the few jump and RIP-relative offsets. :func:`build_probe_kernel` wraps the code in
a one-segment ELF64 executable (:mod:`.asm`). :mod:`.behaviour` holds the behaviours, the
lines the probe prints and their parsers; this module, building and caching the image.

What the guest does, in order:

1. prints :data:`READY_LINE` and ``"\\n"`` on COM1 (I/O port ``0x3f8``), which Firecracker
   copies to its stdout;
2. if ``touch_mib > 0``: writes one byte to every 4 KiB page of ``touch_mib`` MiB of guest
   RAM starting at 16 MiB (physical; Firecracker identity-maps the first 1 GiB), so the
   VMM's resident memory grows by about ``touch_mib`` MiB, then prints
   ``"IRONCLAW-PROBE-TOUCHED <touch_mib>\\n"``;
3. does its :class:`ProbeBehaviour`: reset the machine (Firecracker exits with status 0),
   halt forever, spin forever, or count: print ``"IRONCLAW-PROBE-COUNT <n>\\n"`` (``n`` ten
   decimal digits, from 0 up) every ``count_ticks`` time-stamp-counter ticks, forever.
   ``CMDLINE`` prints ``"IRONCLAW-PROBE-CMDLINE <its kernel command line>\\n"`` and resets:
   what the guest really booted with (``boot_args``, the ``ip=`` the orchestrator added,
   Firecracker's own additions), read through ``rsi``'s boot_params at entry.

The counter lives in guest RAM (the digits of the line it prints, incremented in place), so
it is state a test can see: a snapshot taken at count ``n`` and restored goes on from ``n``
(or ``n + 1``), never from zero, and each clone of one snapshot counts on by itself. Its
delay is a ``rdtsc`` busy-wait (the probe has no interrupts), so a counting probe burns a
host CPU like ``SPIN``; keep counting VMs few and short-lived.

The guest memory size (``mem_size_mib``) must be larger than ``16 + touch_mib``; touching
memory the guest does not have makes the VMM fail, not the probe. Boot it with
:data:`PROBE_BOOT_ARGS` (only the CMDLINE probe reads its command line; the arguments are
those of a Linux guest, so a probe VM is configured like a real one).

How Firecracker (x86_64) starts an ELF kernel, which is all the probe relies on: each
``PT_LOAD`` segment is copied to its physical address (at least 1 MiB), and the vCPU starts
at ``e_entry`` in 64-bit long mode with interrupts off, the first 1 GiB identity-mapped,
and ``rsi`` pointing at the Linux boot_params (the CMDLINE probe reads the command line
pointer at offset ``0x228`` of it; the others ignore it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from ...errors import ConfigError, StagingError
from .asm import _ELF_HEADER_SIZE, _PROGRAM_HEADER_SIZE, _Assembler, _elf64
from .behaviour import (
    CMDLINE_PREFIX,
    COUNT_PREFIX,
    DEFAULT_COUNT_TICKS,
    MAX_TOUCH_MIB,
    PROBE_BOOT_ARGS,
    PROBE_LOAD_ADDRESS,
    READY_LINE,
    TOUCH_START_MIB,
    TOUCHED_PREFIX,
    ProbeBehaviour,
    parse_cmdline,
    parse_counts,
)
from .program import _program

__all__ = [
    "CMDLINE_PREFIX",
    "COUNT_PREFIX",
    "DEFAULT_COUNT_TICKS",
    "MAX_TOUCH_MIB",
    "PROBE_BOOT_ARGS",
    "PROBE_LOAD_ADDRESS",
    "READY_LINE",
    "TOUCHED_PREFIX",
    "TOUCH_START_MIB",
    "ProbeBehaviour",
    "build_probe_kernel",
    "parse_cmdline",
    "parse_counts",
    "probe_kernel_path",
    "probe_listing",
    "write_probe_kernel",
]

#: Environment variable naming the directory :func:`probe_kernel_path` caches images in.
CACHE_DIR_ENV = "IRONCLAW_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("/var/cache/ironclaw/probe")


def _check(
    behaviour: ProbeBehaviour, touch_mib: int, count_ticks: int = DEFAULT_COUNT_TICKS
) -> None:
    if not isinstance(behaviour, ProbeBehaviour):
        raise ConfigError(
            f"probe behaviour {behaviour!r} is not a ProbeBehaviour; "
            f"use one of {[b.name for b in ProbeBehaviour]}"
        )
    if isinstance(touch_mib, bool) or not isinstance(touch_mib, int):
        raise ConfigError(
            f"probe touch_mib {touch_mib!r} is not an int; pass a whole number of MiB"
        )
    if not 0 <= touch_mib <= MAX_TOUCH_MIB:
        raise ConfigError(
            f"probe touch_mib={touch_mib} is out of range; use 0..{MAX_TOUCH_MIB} "
            f"(the touched range starts at {TOUCH_START_MIB} MiB and must stay in the first GiB)"
        )
    if isinstance(count_ticks, bool) or not isinstance(count_ticks, int):
        raise ConfigError(f"probe count_ticks {count_ticks!r} is not an int; pass TSC ticks")
    if not 1 <= count_ticks < 2**31:
        raise ConfigError(
            f"probe count_ticks={count_ticks} is out of range; use 1..{2**31 - 1} "
            "(the wait compares against a sign-extended 32-bit immediate)"
        )


def probe_listing(
    behaviour: ProbeBehaviour = ProbeBehaviour.RESET,
    touch_mib: int = 0,
    *,
    count_ticks: int = DEFAULT_COUNT_TICKS,
) -> str:
    """An assembly listing of the probe's code: load address, bytes, instruction.

    Meant for debugging and review; :func:`build_probe_kernel` emits exactly these bytes
    after the ELF headers.
    """
    _check(behaviour, touch_mib, count_ticks)
    base = PROBE_LOAD_ADDRESS + _ELF_HEADER_SIZE + _PROGRAM_HEADER_SIZE
    rows = []
    for offset, code, asm in _Assembler(_program(behaviour, touch_mib, count_ticks)).lines():
        shown = code.hex(" ") if len(code) <= 8 else code[:8].hex(" ") + " ..."
        rows.append(f"{base + offset:08x}  {shown:<27} {asm}")
    return "\n".join(rows) + "\n"


def build_probe_kernel(
    behaviour: ProbeBehaviour = ProbeBehaviour.RESET,
    touch_mib: int = 0,
    *,
    count_ticks: int = DEFAULT_COUNT_TICKS,
) -> bytes:
    """Return the probe guest as an ELF64 image Firecracker can boot (a few hundred bytes).

    The output depends only on the arguments (no timestamps), so equal arguments give equal
    bytes. ``touch_mib`` (0..:data:`MAX_TOUCH_MIB`) MiB of guest RAM from 16 MiB up are
    written after the ready line; the VM's ``mem_size_mib`` must exceed ``16 + touch_mib``.

    Raises:
        ConfigError: ``behaviour`` is not a :class:`ProbeBehaviour` or ``touch_mib`` is out
            of range.
    """
    _check(behaviour, touch_mib, count_ticks)
    return _elf64(_Assembler(_program(behaviour, touch_mib, count_ticks)).assemble())


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the jailed VMM user must read it
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_probe_kernel(
    path: Path,
    behaviour: ProbeBehaviour = ProbeBehaviour.RESET,
    touch_mib: int = 0,
    *,
    count_ticks: int = DEFAULT_COUNT_TICKS,
) -> Path:
    """Build the probe kernel and write it to ``path`` atomically (temp file + rename).

    The file gets mode 0644. Readers never see a partial file: they find either the old
    file or the complete new one. Returns ``path``.

    Raises:
        ConfigError: bad ``behaviour`` or ``touch_mib`` (nothing is written).
        StagingError: the file could not be written (directory missing, not writable, ...).
    """
    data = build_probe_kernel(behaviour, touch_mib, count_ticks=count_ticks)
    path = Path(path)
    try:
        _write_atomically(path, data)
    except OSError as exc:
        raise StagingError(
            f"could not write the probe kernel to {path}: {exc}; "
            f"make sure {path.parent} exists and is writable"
        ) from exc
    return path


def _usable_dir(directory: Path) -> bool:
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError:
        return False
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


def _default_cache_dirs() -> list[Path]:
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return [Path(env)]
    return [DEFAULT_CACHE_DIR, Path.home() / ".cache" / "ironclaw" / "probe"]


def probe_kernel_path(
    behaviour: ProbeBehaviour = ProbeBehaviour.RESET,
    touch_mib: int = 0,
    cache_dir: Path | None = None,
    *,
    count_ticks: int = DEFAULT_COUNT_TICKS,
) -> Path:
    """Return the path of a cached probe kernel, building it first if needed.

    The directory is ``cache_dir`` if given, else ``$IRONCLAW_CACHE_DIR`` if set, else
    ``/var/cache/ironclaw/probe``, falling back to ``~/.cache/ironclaw/probe`` when that
    cannot be created or written. It is created if missing.

    The file name, ``ironclaw-probe-<behaviour>-touch<N>-<hash>.elf``, contains the first
    16 hex digits of the image's SHA-256, so a file built by another version of this module
    is never reused; an existing file whose content differs (truncated, edited) is
    rewritten. Concurrent callers are safe: each writes atomically and the content is equal.

    Raises:
        ConfigError: bad ``behaviour`` or ``touch_mib``.
        StagingError: no usable cache directory, or the file could not be written.
    """
    data = build_probe_kernel(behaviour, touch_mib, count_ticks=count_ticks)
    digest = hashlib.sha256(data).hexdigest()[:16]
    name = f"ironclaw-probe-{behaviour.value}-touch{touch_mib}-{digest}.elf"

    candidates = [Path(cache_dir)] if cache_dir is not None else _default_cache_dirs()
    directory = next((d for d in candidates if _usable_dir(d)), None)
    if directory is None:
        tried = ", ".join(str(d) for d in candidates)
        raise StagingError(
            f"no usable cache directory for the probe kernel (tried {tried}); "
            f"pass cache_dir= or set {CACHE_DIR_ENV} to a writable directory"
        )

    path = directory / name
    try:
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return path
    except OSError:
        pass  # unreadable: rewrite it below
    return write_probe_kernel(path, behaviour, touch_mib, count_ticks=count_ticks)
