"""The probe's image builder: a two-pass assembler for hand-encoded x86_64 instructions and
the one-segment ELF64 executable that wraps the code.

Instructions are written as their machine-code bytes next to the assembly they encode (see
:mod:`.program`); :class:`_Assembler` only resolves jump and RIP-relative offsets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .behaviour import PROBE_LOAD_ADDRESS

#: Page size: the ELF segment alignment (and the stride of the probe's memory touch).
_PAGE = 4096
_ELF_HEADER_SIZE = 64
_PROGRAM_HEADER_SIZE = 56


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
