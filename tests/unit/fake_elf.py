"""Tiny static x86_64 Linux executables, made here, standing in for release binaries.

``ironclaw install`` refuses anything that is not an ELF executable for the target arch and
runs each binary's ``--version``; these few bytes of machine code pass as (or, on purpose,
fail as) firecracker and jailer without a real binary in the repository.
"""

from __future__ import annotations

import platform
import struct

import pytest

_BASE = 0x400000
_HEADERS = 64 + 56  # ELF header + one program header
_MACHINES = {"x86_64": 62, "aarch64": 183}

#: Skip marker for tests that execute the fakes.
needs_x86_64 = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"),
    reason="the fake release binaries are x86_64 machine code",
)


def _write_exit(output: bytes, exit_code: int) -> bytes:
    code = b"".join(
        [
            b"\xb8\x01\x00\x00\x00",  # mov eax, 1 (write)
            b"\xbf\x01\x00\x00\x00",  # mov edi, 1 (stdout)
            b"\x48\x8d\x35" + struct.pack("<i", 19),  # lea rsi, [rip + 19] (the text below)
            b"\xba" + struct.pack("<I", len(output)),  # mov edx, len
            b"\x0f\x05",  # syscall
            b"\xb8\x3c\x00\x00\x00",  # mov eax, 60 (exit)
            b"\xbf" + struct.pack("<I", exit_code),  # mov edi, exit_code
            b"\x0f\x05",  # syscall
        ]
    )
    return code + output


_PAUSE_FOREVER = b"\xb8\x22\x00\x00\x00\x0f\x05\xeb\xf7"  # loop: pause(); jmp loop
_FORK = b"\xb8\x39\x00\x00\x00\x0f\x05"  # fork(): parent and child go on alike


def elf(code: bytes, *, machine: str = "x86_64", padding: bytes = b"") -> bytes:
    """An ELF executable that loads ``code`` and starts at its first byte."""
    size = _HEADERS + len(code)
    header = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + b"\0" * 9,
        2,  # ET_EXEC
        _MACHINES[machine],
        1,
        _BASE + _HEADERS,  # entry
        64,  # program headers right after this header
        0,
        0,
        64,
        56,
        1,
        0,
        0,
        0,
    )
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, _BASE, _BASE, size, size, 0x1000)  # PT_LOAD, R+X
    return header + load + code + padding


def printing(
    text: str, *, exit_code: int = 0, padding: bytes = b"", machine: str = "x86_64"
) -> bytes:
    """Prints ``text`` to stdout and exits with ``exit_code``."""
    return elf(_write_exit(text.encode(), exit_code), machine=machine, padding=padding)


def hanging(*, fork: bool = False) -> bytes:
    """Never exits (sleeps in pause()); with ``fork``, leaves a child doing the same."""
    return elf((_FORK if fork else b"") + _PAUSE_FOREVER)


def release_binary(program: str, version: str, *, padding: bytes = b"") -> bytes:
    """What ``program --version`` prints in a release (v1.0 .. v1.16): banner, blank line."""
    banner = {"firecracker": "Firecracker", "jailer": "Jailer"}[program]
    return printing(f"{banner} {version}\n\n", padding=padding)
