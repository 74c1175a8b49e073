"""The probe guest: a tiny x86_64 ELF kernel that Firecracker boots, built by this module.

Linux guests need a kernel built with options some hosts lack, and some hosts (nested
hypervisors) cannot boot Linux at all. The probe is what the project boots instead when it
only needs *a* guest: to check that a VMM really started, to make it use memory (cgroup
limit and OOM tests) or CPU (quota tests), and to make it exit on its own.

It is generated from this file, never committed as a binary and never assembled by an
external tool: every instruction below is written as its machine-code bytes next to the
assembly they encode, and :class:`_Assembler` resolves the few jump and RIP-relative
offsets. :func:`build_probe_kernel` wraps the code in a one-segment ELF64 executable.

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
import enum
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, StagingError

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

#: The first line the probe prints on its serial console (followed by ``"\n"``).
READY_LINE = "IRONCLAW-PROBE-READY"
#: The line printed after the memory touch, followed by ``" <touch_mib>\n"``.
TOUCHED_PREFIX = "IRONCLAW-PROBE-TOUCHED"
#: Each line a counting probe prints: this, a space, ten decimal digits, ``"\n"``.
COUNT_PREFIX = "IRONCLAW-PROBE-COUNT"
_COUNT_DIGITS = 10
#: The line a CMDLINE probe prints: this, a space, its kernel command line, ``"\n"``.
CMDLINE_PREFIX = "IRONCLAW-PROBE-CMDLINE"
#: boot_params (the "zero page"): offset of ``hdr.cmd_line_ptr``, a 32-bit physical address.
_CMD_LINE_PTR = 0x228
#: The most command-line bytes the probe looks at for the terminating NUL.
_CMDLINE_SCAN = 4096
#: Time-stamp-counter ticks between two count lines (about 10-20 ms on a 2-3 GHz host).
DEFAULT_COUNT_TICKS = 1 << 25
#: Kernel command line for a probe VM (the same as a Linux guest's; the probe ignores it).
PROBE_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
#: Physical (= virtual) address the image is linked and loaded at: above the 1 MiB that
#: Firecracker requires, below the smallest guest memory it accepts.
PROBE_LOAD_ADDRESS = 0x200000
#: Where the memory touch starts, in MiB of guest-physical memory.
TOUCH_START_MIB = 16
#: Largest ``touch_mib``: the touched range must stay inside the identity-mapped first GiB.
MAX_TOUCH_MIB = 1024 - TOUCH_START_MIB

#: Environment variable naming the directory :func:`probe_kernel_path` caches images in.
CACHE_DIR_ENV = "IRONCLAW_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("/var/cache/ironclaw/probe")

_COM1 = 0x3F8
_COM1_LSR = _COM1 + 5  # line status register; bit 5 = transmit holding register empty
_LSR_THR_EMPTY = 0x20
_I8042_COMMAND = 0x64
_I8042_RESET = 0xFE
_PAGE = 4096
_TOUCH_BYTE = 0xA5  # non-zero, so that no layer can treat the page as still all zero
_STACK_TOP = PROBE_LOAD_ADDRESS  # the stack grows down into free RAM below the image

_ELF_HEADER_SIZE = 64
_PROGRAM_HEADER_SIZE = 56


class ProbeBehaviour(enum.Enum):
    """What the probe guest does after printing its line(s)."""

    #: Reset the machine through the i8042 controller (``0xfe`` to port ``0x64``);
    #: Firecracker then exits with status 0, as it does for a Linux guest's ``reboot=k``.
    RESET = "reset"
    #: ``cli; hlt`` forever: the VMM keeps running, idle, until it is stopped. The guest
    #: ignores ``SendCtrlAltDel``, so stopping it means killing the VMM.
    HALT = "halt"
    #: Busy-loop forever: the vCPU thread burns a full host CPU until the VMM is stopped.
    SPIN = "spin"
    #: Print a counter line every ``count_ticks`` TSC ticks, forever (busy-waits like SPIN).
    COUNT = "count"
    #: Print ``"IRONCLAW-PROBE-CMDLINE <the kernel command line it was booted with>\n"``
    #: (read through the boot_params that ``rsi`` points at on entry), then reset like RESET.
    CMDLINE = "cmdline"
    #: Print counter lines as fast as the serial port takes them, forever (no wait between
    #: lines): a guest flooding its console, for the console byte budget.
    FLOOD = "flood"


# --------------------------------------------------------------------------- assembler


@dataclass(frozen=True)
class _Insn:
    """One instruction: fixed bytes, optionally followed by a relative offset to a label.

    ``rel_size`` is 0 (no offset), 1 (rel8) or 4 (rel32). The offset is counted from the
    end of the instruction, as the CPU does for jumps, calls and RIP-relative operands.
    """

    asm: str
    opcode: bytes
    target: str | None = None
    rel_size: int = 0
    imm: bytes = b""

    @property
    def size(self) -> int:
        """Encoded length in bytes (known before labels are resolved)."""
        return len(self.opcode) + self.rel_size + len(self.imm)


@dataclass(frozen=True)
class _Label:
    name: str


@dataclass(frozen=True)
class _Data:
    asm: str
    data: bytes


_Item = _Insn | _Label | _Data


def _u8(value: int) -> bytes:
    return struct.pack("<B", value)


def _u16(value: int) -> bytes:
    return struct.pack("<H", value)


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


class _Assembler:
    """Two passes over instructions whose sizes are fixed: place labels, then encode."""

    def __init__(self, items: list[_Item]) -> None:
        self._items = items
        self._labels: dict[str, int] = {}
        offset = 0
        for item in items:
            if isinstance(item, _Label):
                if item.name in self._labels:
                    raise ValueError(f"probe assembler: label {item.name!r} defined twice")
                self._labels[item.name] = offset
            elif isinstance(item, _Insn):
                offset += item.size
            else:
                offset += len(item.data)

    def _encode(self, insn: _Insn, offset: int) -> bytes:
        if insn.target is None:
            return insn.opcode + insn.imm
        rel = self._labels[insn.target] - (offset + insn.size)
        if insn.rel_size == 1:
            if not -128 <= rel <= 127:
                raise ValueError(f"probe assembler: {insn.asm!r} target out of rel8 range")
            return insn.opcode + struct.pack("<b", rel) + insn.imm
        return insn.opcode + struct.pack("<i", rel) + insn.imm

    def lines(self) -> Iterator[tuple[int, bytes, str]]:
        """Yield ``(offset, encoded bytes, assembly)``; labels yield empty bytes."""
        offset = 0
        for item in self._items:
            if isinstance(item, _Label):
                yield offset, b"", f"{item.name}:"
            elif isinstance(item, _Insn):
                yield offset, self._encode(item, offset), f"    {item.asm}"
                offset += item.size
            else:
                yield offset, item.data, f"    {item.asm}"
                offset += len(item.data)

    def assemble(self) -> bytes:
        """The encoded program."""
        return b"".join(code for _, code, _ in self.lines())


def _program(
    behaviour: ProbeBehaviour, touch_mib: int, count_ticks: int = DEFAULT_COUNT_TICKS
) -> list[_Item]:
    """The probe's code and data, each instruction as (bytes it encodes to, assembly).

    Opcode notes (Intel SDM vol. 2): ``REX.W`` = ``0x48``; ModRM byte = mod<<6 | reg<<3 | rm
    with rsi = 6, rdi = 7 and rm = 101 + mod 00 meaning ``[rip + disp32]``.
    """
    ready = (READY_LINE + "\n").encode("ascii")
    touched = f"{TOUCHED_PREFIX} {touch_mib}\n".encode("ascii")
    pages = touch_mib * (1024 * 1024 // _PAGE)
    touch_start = TOUCH_START_MIB * 1024 * 1024

    def lea_rsi(label: str) -> _Insn:
        # REX.W 8D /r, ModRM 00 110 101 = 0x35: rsi <- rip + disp32
        return _Insn(f"lea rsi, [rip + {label}]", b"\x48\x8d\x35", label, 4)

    def mov_ecx(value: int) -> _Insn:
        # B8+rd id, rd = ecx (1); writing ecx zero-extends into rcx
        return _Insn(f"mov ecx, {value:#x}", b"\xb9", imm=_u32(value))

    def call(label: str) -> _Insn:
        return _Insn(f"call {label}", b"\xe8", label, 4)  # E8 cd

    items: list[_Item] = [
        _Label("_start"),
        _Insn("cld", b"\xfc"),  # lodsb below must count upwards
        *_keep_boot_params(behaviour),
        _Insn(f"mov esp, {_STACK_TOP:#x}", b"\xbc", imm=_u32(_STACK_TOP)),  # B8+rd, rd = esp
        lea_rsi("ready_msg"),
        mov_ecx(len(ready)),
        call("print"),
    ]
    if touch_mib > 0:
        items += [
            # BF id: mov edi, imm32 (rd = edi, zero-extended into rdi)
            _Insn(f"mov edi, {touch_start:#x}", b"\xbf", imm=_u32(touch_start)),
            mov_ecx(pages),
            _Label("touch"),
            # C6 /0 ib, ModRM 00 000 111 = 0x07: byte [rdi] <- imm8
            _Insn(f"mov byte [rdi], {_TOUCH_BYTE:#x}", b"\xc6\x07", imm=_u8(_TOUCH_BYTE)),
            # REX.W 81 /0 id, ModRM 11 000 111 = 0xc7: rdi += imm32
            _Insn(f"add rdi, {_PAGE:#x}", b"\x48\x81\xc7", imm=_u32(_PAGE)),
            _Insn("loop touch", b"\xe2", "touch", 1),  # E2 cb: rcx -= 1, jump if rcx != 0
            lea_rsi("touched_msg"),
            mov_ecx(len(touched)),
            call("print"),
        ]
    if behaviour is ProbeBehaviour.CMDLINE:
        items += _cmdline_print()
    if behaviour is ProbeBehaviour.RESET:
        items += [
            _Insn(f"mov al, {_I8042_RESET:#x}", b"\xb0", imm=_u8(_I8042_RESET)),  # B0+rb ib
            # E6 ib: out imm8, al -> i8042 "pulse reset line"; Firecracker exits
            _Insn(f"out {_I8042_COMMAND:#x}, al", b"\xe6", imm=_u8(_I8042_COMMAND)),
            # Should the reset not take effect, fall through into the halt loop.
        ]
    if behaviour is ProbeBehaviour.SPIN:
        items += [
            _Label("spin"),
            _Insn("jmp spin", b"\xeb", "spin", 1),  # EB cb: jmp to itself, burns the CPU
        ]
    elif behaviour is ProbeBehaviour.COUNT:
        items += _count_loop(count_ticks)
    elif behaviour is ProbeBehaviour.FLOOD:
        items += _count_loop(count_ticks, wait=False)
    else:
        items += [
            _Label("halt"),
            _Insn("cli", b"\xfa"),  # interrupts stay off, so hlt never returns ...
            _Insn("hlt", b"\xf4"),
            _Insn("jmp halt", b"\xeb", "halt", 1),  # ... but loop anyway (NMIs)
        ]
    items += [
        # print: write rcx bytes from [rsi] to COM1, waiting for the transmitter each time.
        _Label("print"),
        _Insn(f"mov dx, {_COM1_LSR:#x}", b"\x66\xba", imm=_u16(_COM1_LSR)),  # 66 B8+rw iw
        _Label("wait_thr"),
        _Insn("in al, dx", b"\xec"),  # EC
        _Insn(f"test al, {_LSR_THR_EMPTY:#x}", b"\xa8", imm=_u8(_LSR_THR_EMPTY)),  # A8 ib
        _Insn("jz wait_thr", b"\x74", "wait_thr", 1),  # 74 cb
        _Insn(f"mov dx, {_COM1:#x}", b"\x66\xba", imm=_u16(_COM1)),
        _Insn("lodsb", b"\xac"),  # AC: al <- [rsi], rsi += 1
        _Insn("out dx, al", b"\xee"),  # EE
        _Insn("loop print", b"\xe2", "print", 1),  # E2 cb
        _Insn("ret", b"\xc3"),  # C3
        _Label("ready_msg"),
        _Data(f"db {ready!r}", ready),
    ]
    if touch_mib > 0:
        items += [_Label("touched_msg"), _Data(f"db {touched!r}", touched)]
    if behaviour in (ProbeBehaviour.COUNT, ProbeBehaviour.FLOOD):
        prefix = f"{COUNT_PREFIX} ".encode("ascii")
        digits = b"0" * _COUNT_DIGITS
        items += [
            # The line lives in guest RAM and its digits are the counter itself.
            _Label("count_msg"),
            _Data(f"db {prefix + digits[:-1]!r}", prefix + digits[:-1]),
            _Label("count_last_digit"),
            _Data("db b'0\\n'", b"0\n"),
        ]
    if behaviour is ProbeBehaviour.CMDLINE:
        prefix = f"{CMDLINE_PREFIX} ".encode("ascii")
        items += [
            _Label("cmdline_msg"),
            _Data(f"db {prefix!r}", prefix),
            _Label("newline"),
            _Data("db b'\\n'", b"\n"),
        ]
    return items


def _keep_boot_params(behaviour: ProbeBehaviour) -> list[_Item]:
    """``rbp`` <- ``rsi`` (the boot_params pointer), which ``print`` and the touch loop keep."""
    if behaviour is not ProbeBehaviour.CMDLINE:
        return []
    return [_Insn("mov rbp, rsi", b"\x48\x89\xf5")]  # REX.W 89 /r, ModRM 11 110 101


def _cmdline_print() -> list[_Item]:
    """Print the prefix, the NUL-terminated command line at ``boot_params.hdr.cmd_line_ptr``
    (a 32-bit physical address, identity-mapped), ``"\\n"``; then reset (and halt)."""
    prefix_len = len(CMDLINE_PREFIX) + 1
    return [
        _Insn("lea rsi, [rip + cmdline_msg]", b"\x48\x8d\x35", "cmdline_msg", 4),
        _Insn(f"mov ecx, {prefix_len:#x}", b"\xb9", imm=_u32(prefix_len)),
        _Insn("call print", b"\xe8", "print", 4),
        # 8B /r, ModRM 10 110 101 = 0xb5: esi <- dword [rbp + disp32] (zero-extends into rsi)
        _Insn(f"mov esi, dword [rbp + {_CMD_LINE_PTR:#x}]", b"\x8b\xb5", imm=_u32(_CMD_LINE_PTR)),
        # strlen, at most _CMDLINE_SCAN bytes: repne scasb leaves rcx = max - (len + 1).
        _Insn("mov rdi, rsi", b"\x48\x89\xf7"),  # REX.W 89 /r, ModRM 11 110 111
        _Insn("xor eax, eax", b"\x31\xc0"),  # 31 /r: al = 0, the byte searched for
        _Insn(f"mov ecx, {_CMDLINE_SCAN:#x}", b"\xb9", imm=_u32(_CMDLINE_SCAN)),
        _Insn("repne scasb", b"\xf2\xae"),  # F2 AE
        _Insn("neg ecx", b"\xf7\xd9"),  # F7 /3, ModRM 11 011 001
        # 81 /0 id, ModRM 11 000 001: ecx = max - 1 - rcx, the length
        _Insn(f"add ecx, {_CMDLINE_SCAN - 1:#x}", b"\x81\xc1", imm=_u32(_CMDLINE_SCAN - 1)),
        _Insn("jz cmdline_done", b"\x74", "cmdline_done", 1),  # empty: print needs rcx > 0
        _Insn("call print", b"\xe8", "print", 4),  # rsi still points at the command line
        _Label("cmdline_done"),
        _Insn("lea rsi, [rip + newline]", b"\x48\x8d\x35", "newline", 4),
        _Insn("mov ecx, 0x1", b"\xb9", imm=_u32(1)),
        _Insn("call print", b"\xe8", "print", 4),
        _Insn(f"mov al, {_I8042_RESET:#x}", b"\xb0", imm=_u8(_I8042_RESET)),
        _Insn(f"out {_I8042_COMMAND:#x}, al", b"\xe6", imm=_u8(_I8042_COMMAND)),
    ]


def parse_cmdline(console: str) -> str | None:
    """The command line a CMDLINE probe printed on ``console`` (a whole line), or ``None``."""
    prefix = CMDLINE_PREFIX + " "
    for line in console.split("\n")[:-1]:
        if line.startswith(prefix):
            return line[len(prefix) :].rstrip("\r")
    return None


def _count_len() -> int:
    return len(COUNT_PREFIX) + 1 + _COUNT_DIGITS + 1


def _count_loop(count_ticks: int, *, wait: bool = True) -> list[_Item]:
    """Print the count line, busy-wait ``count_ticks`` TSC ticks (unless not ``wait``), add
    one to the digits."""

    def rdtsc64() -> list[_Item]:
        return [
            _Insn("rdtsc", b"\x0f\x31"),  # 0F 31: edx:eax <- TSC
            _Insn("shl rdx, 0x20", b"\x48\xc1\xe2\x20"),  # REX.W C1 /4 ib, ModRM 11 100 010
            _Insn("or rax, rdx", b"\x48\x09\xd0"),  # REX.W 09 /r, ModRM 11 010 000
        ]

    delay: list[_Item] = [
        *rdtsc64(),
        _Insn("mov rbx, rax", b"\x48\x89\xc3"),  # REX.W 89 /r, ModRM 11 000 011
        _Label("count_wait"),
        _Insn("pause", b"\xf3\x90"),  # F3 90: spin-wait hint
        *rdtsc64(),
        _Insn("sub rax, rbx", b"\x48\x29\xd8"),  # REX.W 29 /r, ModRM 11 011 000
        # REX.W 3D id: cmp rax, imm32 (sign-extended, hence count_ticks < 2**31)
        _Insn(f"cmp rax, {count_ticks:#x}", b"\x48\x3d", imm=_u32(count_ticks)),
        _Insn("jb count_wait", b"\x72", "count_wait", 1),  # 72 cb
    ]
    return [
        _Label("count_loop"),
        _Insn("lea rsi, [rip + count_msg]", b"\x48\x8d\x35", "count_msg", 4),
        _Insn(f"mov ecx, {_count_len():#x}", b"\xb9", imm=_u32(_count_len())),
        _Insn("call print", b"\xe8", "print", 4),
        *(delay if wait else []),
        # Decimal increment in place, from the last digit leftwards while it carries.
        _Insn("lea rdi, [rip + count_last_digit]", b"\x48\x8d\x3d", "count_last_digit", 4),
        _Label("count_carry"),
        _Insn("inc byte [rdi]", b"\xfe\x07"),  # FE /0, ModRM 00 000 111
        _Insn("cmp byte [rdi], 0x3a", b"\x80\x3f\x3a"),  # 80 /7 ib: past '9'?
        _Insn("jne count_loop", b"\x75", "count_loop", 1),  # 75 cb
        _Insn("mov byte [rdi], 0x30", b"\xc6\x07\x30"),  # C6 /0 ib: back to '0' ...
        _Insn("dec rdi", b"\x48\xff\xcf"),  # REX.W FF /1, ModRM 11 001 111
        _Insn("jmp count_carry", b"\xeb", "count_carry", 1),  # ... and carry left
    ]


# --------------------------------------------------------------------------- ELF image


def _elf64(code: bytes) -> bytes:
    """Wrap ``code`` in an ELF64 executable with one R+X ``PT_LOAD`` segment.

    The segment covers the whole file (headers included) so that file offset and load
    address differ by a constant; the entry point is the first byte after the headers.
    """
    headers = _ELF_HEADER_SIZE + _PROGRAM_HEADER_SIZE
    entry = PROBE_LOAD_ADDRESS + headers
    size = headers + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, LSB, version 1, SysV
    elf_header = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # e_type: ET_EXEC
        0x3E,  # e_machine: EM_X86_64
        1,  # e_version
        entry,  # e_entry
        _ELF_HEADER_SIZE,  # e_phoff: program headers right after this header
        0,  # e_shoff: no section headers
        0,  # e_flags
        _ELF_HEADER_SIZE,  # e_ehsize
        _PROGRAM_HEADER_SIZE,  # e_phentsize
        1,  # e_phnum
        0,  # e_shentsize
        0,  # e_shnum
        0,  # e_shstrndx: SHN_UNDEF
    )
    program_header = struct.pack(
        "<IIQQQQQQ",
        1,  # p_type: PT_LOAD
        5,  # p_flags: PF_R | PF_X
        0,  # p_offset
        PROBE_LOAD_ADDRESS,  # p_vaddr
        PROBE_LOAD_ADDRESS,  # p_paddr: where Firecracker copies the segment
        size,  # p_filesz
        size,  # p_memsz
        _PAGE,  # p_align
    )
    return elf_header + program_header + code


# --------------------------------------------------------------------------- public API


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


def parse_counts(console: str) -> list[int]:
    """The counter values in a counting probe's console output, in order (whole lines only)."""
    prefix = COUNT_PREFIX + " "
    values = []
    for line in console.split("\n")[:-1]:  # the last piece may be a line still being written
        if line.startswith(prefix) and len(line) == _count_len() - 1 and line[-10:].isdigit():
            values.append(int(line[len(prefix) :]))
    return values
