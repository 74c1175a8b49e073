"""The probe's code: what each :class:`ProbeBehaviour` runs, as items (the bytes each
instruction encodes to, next to its assembly) for :class:`~.asm._Assembler`.

Hardware it drives: COM1 (port ``0x3f8``) for the console lines, the i8042 controller for
the reset, the time-stamp counter for the count delay, the boot_params ``rsi`` points at.
"""

from __future__ import annotations

from .asm import _PAGE, _Data, _Insn, _Item, _Label, _u8, _u16, _u32
from .behaviour import (
    _COUNT_DIGITS,
    CMDLINE_PREFIX,
    COUNT_PREFIX,
    DEFAULT_COUNT_TICKS,
    PROBE_LOAD_ADDRESS,
    READY_LINE,
    TOUCH_START_MIB,
    TOUCHED_PREFIX,
    ProbeBehaviour,
    _count_len,
)

#: boot_params (the "zero page"): offset of ``hdr.cmd_line_ptr``, a 32-bit physical address.
_CMD_LINE_PTR = 0x228
#: The most command-line bytes the probe looks at for the terminating NUL.
_CMDLINE_SCAN = 4096
_COM1 = 0x3F8
_COM1_LSR = _COM1 + 5  # line status register; bit 5 = transmit holding register empty
_LSR_THR_EMPTY = 0x20
_I8042_COMMAND = 0x64
_I8042_RESET = 0xFE
_TOUCH_BYTE = 0xA5  # non-zero, so that no layer can treat the page as still all zero
_STACK_TOP = PROBE_LOAD_ADDRESS  # the stack grows down into free RAM below the image


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
