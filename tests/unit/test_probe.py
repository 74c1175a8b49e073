"""Unit tests of the probe guest generator: ELF structure, content, determinism, caching."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError, StagingError
from ironclaw_orchestrator.vm import probe
from ironclaw_orchestrator.vm.probe import (
    CMDLINE_PREFIX,
    COUNT_PREFIX,
    DEFAULT_COUNT_TICKS,
    MAX_TOUCH_MIB,
    PROBE_BOOT_ARGS,
    READY_LINE,
    ProbeBehaviour,
    build_probe_kernel,
    parse_cmdline,
    parse_counts,
    probe_kernel_path,
    probe_listing,
    write_probe_kernel,
)

ALL_VARIANTS = [(b, t) for b in ProbeBehaviour for t in (0, 1, 64)]

PT_LOAD = 1
PF_X, PF_W, PF_R = 1, 2, 4


def parse_elf(image: bytes) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Parse an ELF64 little-endian header and its program headers with ``struct``."""
    assert image[:4] == b"\x7fELF"
    names = [
        "type",
        "machine",
        "version",
        "entry",
        "phoff",
        "shoff",
        "flags",
        "ehsize",
        "phentsize",
        "phnum",
        "shentsize",
        "shnum",
        "shstrndx",
    ]
    header = dict(zip(names, struct.unpack_from("<HHIQQQIHHHHHH", image, 16), strict=True))
    header["class"], header["data"], header["ident_version"] = image[4], image[5], image[6]
    ph_names = ["type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align"]
    segments = [
        dict(
            zip(
                ph_names,
                struct.unpack_from("<IIQQQQQQ", image, header["phoff"] + i * header["phentsize"]),
                strict=True,
            )
        )
        for i in range(header["phnum"])
    ]
    return header, segments


@pytest.mark.parametrize(("behaviour", "touch_mib"), ALL_VARIANTS)
def test_elf_structure_is_what_firecracker_loads(behaviour: ProbeBehaviour, touch_mib: int) -> None:
    image = build_probe_kernel(behaviour, touch_mib)
    header, segments = parse_elf(image)

    assert header["class"] == 2  # ELFCLASS64
    assert header["data"] == 1  # little endian
    assert header["ident_version"] == 1
    assert header["type"] == 2  # ET_EXEC
    assert header["machine"] == 0x3E  # EM_X86_64
    assert header["version"] == 1
    assert header["ehsize"] == 64
    assert header["phentsize"] == 56  # linux-loader rejects any other size
    assert header["phoff"] >= 64  # ... and program headers overlapping the ELF header
    assert header["shnum"] == 0

    loads = [s for s in segments if s["type"] == PT_LOAD]
    assert len(loads) == 1
    seg = loads[0]
    assert seg["paddr"] == seg["vaddr"] == probe.PROBE_LOAD_ADDRESS
    assert seg["paddr"] >= 1 << 20  # firecracker's lowest kernel address
    assert seg["paddr"] + seg["memsz"] <= 128 << 20  # inside the smallest guest memory
    assert seg["offset"] == 0
    assert seg["filesz"] == seg["memsz"] == len(image)
    assert seg["flags"] == PF_R | PF_X
    assert seg["offset"] % seg["align"] == seg["vaddr"] % seg["align"]

    # The entry point is the first byte of code, right after the headers, inside the segment.
    headers_size = header["phoff"] + header["phnum"] * header["phentsize"]
    assert header["entry"] == seg["vaddr"] + headers_size
    assert seg["vaddr"] <= header["entry"] < seg["vaddr"] + seg["filesz"]
    assert image[headers_size] == 0xFC  # cld: the first instruction

    assert len(image) < 512  # a few hundred bytes


@pytest.mark.parametrize(("behaviour", "touch_mib"), ALL_VARIANTS)
def test_ready_line_is_embedded_once(behaviour: ProbeBehaviour, touch_mib: int) -> None:
    image = build_probe_kernel(behaviour, touch_mib)
    assert image.count((READY_LINE + "\n").encode()) == 1


def test_touched_line_only_when_touching() -> None:
    assert b"TOUCHED" not in build_probe_kernel(ProbeBehaviour.HALT, 0)
    image = build_probe_kernel(ProbeBehaviour.HALT, 64)
    assert b"IRONCLAW-PROBE-TOUCHED 64\n" in image
    # ecx = number of 4 KiB pages, then the page-touch store ``mov byte [rdi], 0xa5``
    assert b"\xb9" + struct.pack("<I", 64 * 256) in image
    assert b"\xc6\x07\xa5" in image
    assert b"\xbf" + struct.pack("<I", 16 << 20) in image  # mov edi, 16 MiB


def test_behaviour_tails() -> None:
    reset = build_probe_kernel(ProbeBehaviour.RESET)
    halt = build_probe_kernel(ProbeBehaviour.HALT)
    spin = build_probe_kernel(ProbeBehaviour.SPIN)
    reset_seq = b"\xb0\xfe\xe6\x64"  # mov al, 0xfe; out 0x64, al
    halt_loop = b"\xfa\xf4\xeb\xfc"  # cli; hlt; jmp back to cli
    assert reset_seq in reset
    assert halt_loop in reset  # fallback should the reset not happen
    assert reset_seq not in halt and halt_loop in halt
    assert reset_seq not in spin and halt_loop not in spin
    assert b"\xeb\xfe" in spin  # jmp to itself


def test_output_is_deterministic_and_distinct() -> None:
    images = {(b, t): build_probe_kernel(b, t) for b, t in ALL_VARIANTS}
    for (b, t), image in images.items():
        assert build_probe_kernel(b, t) == image
    assert len(set(images.values())) == len(images)
    assert build_probe_kernel() == images[(ProbeBehaviour.RESET, 0)]


def test_listing_matches_image() -> None:
    image = build_probe_kernel(ProbeBehaviour.RESET, 64)
    listing = probe_listing(ProbeBehaviour.RESET, 64)
    assert "out 0x64, al" in listing
    assert "lea rsi, [rip + ready_msg]" in listing
    code_offset = 64 + 56
    for line in listing.splitlines():
        addr_text, rest = line.split(maxsplit=1)
        addr = int(addr_text, 16)
        hex_part = rest[:27].strip()
        if not hex_part or hex_part.endswith(":") or "..." in hex_part:
            continue
        encoded = bytes.fromhex(hex_part.replace(" ", ""))
        offset = addr - probe.PROBE_LOAD_ADDRESS
        assert offset >= code_offset
        assert image[offset : offset + len(encoded)] == encoded, line


def parse_listing(listing: str) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
    """Labels -> address, and (address, mnemonic, operands) per instruction (no data)."""
    labels: dict[str, int] = {}
    insns: list[tuple[int, str, str]] = []
    for line in listing.splitlines():
        addr, asm = int(line[:8], 16), line[38:].strip()
        if asm.endswith(":"):
            labels[asm[:-1]] = addr
        elif not asm.startswith("db "):
            mnemonic, _, operands = asm.partition(" ")
            insns.append((addr, mnemonic, operands))
    return labels, insns


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
@pytest.mark.parametrize("behaviour", list(ProbeBehaviour))
def test_hand_encoding_agrees_with_objdump(behaviour: ProbeBehaviour, tmp_path: Path) -> None:
    """Cross-check the hand-assembled bytes with binutils' disassembler, where it exists.

    Same instructions at the same addresses, and every jump, call and RIP-relative operand
    that names a label resolves to that label's address.
    """
    labels, insns = parse_listing(probe_listing(behaviour, 8))
    raw = tmp_path / "probe.bin"
    raw.write_bytes(build_probe_kernel(behaviour, 8))
    out = subprocess.run(
        [
            "objdump",
            "-D",
            "-b",
            "binary",
            "-m",
            "i386:x86-64",
            "-M",
            "intel",
            f"--adjust-vma={probe.PROBE_LOAD_ADDRESS:#x}",
            f"--start-address={labels['_start']:#x}",
            f"--stop-address={labels['ready_msg']:#x}",
            str(raw),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    decoded = [
        (int(m.group(1), 16), m.group(2), m.group(3))
        for m in re.finditer(r"^ *([0-9a-f]+):\t(?:[0-9a-f]{2} )+ *\t(\w+)[ \t]*(.*)$", out, re.M)
    ]
    aliases = {"jz": "je", "lodsb": "lods", "repne": "repnz"}
    assert [(a, aliases.get(m, m)) for a, m, _ in insns] == [(a, m) for a, m, _ in decoded], out
    for (_, _, operands), (_, _, objdump_operands) in zip(insns, decoded, strict=True):
        named = [name for name in labels if re.search(rf"\b{name}\b", operands)]
        if named:
            target = re.search(r"0x([0-9a-f]+)\s*$", objdump_operands)
            assert target is not None, objdump_operands
            assert int(target.group(1), 16) == labels[named[0]], (operands, objdump_operands)


def _operands(text: str) -> str:
    """Intel operands in one spelling: ours ``dword [rbp + 0x228]``, objdump's
    ``DWORD PTR [rbp+0x228]``."""
    return re.sub(r"\s+", "", text.lower().replace(" ptr ", " ").split("#")[0])


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
@pytest.mark.parametrize("behaviour", list(ProbeBehaviour))
def test_operands_agree_with_objdump(behaviour: ProbeBehaviour, tmp_path: Path) -> None:
    """Registers, immediates and memory operands too, not only mnemonics and jump targets
    (e.g. the CMDLINE probe's ``mov esi, dword [rbp + 0x228]``, boot_params.cmd_line_ptr)."""
    labels, insns = parse_listing(probe_listing(behaviour, 8))
    raw = tmp_path / "probe.bin"
    raw.write_bytes(build_probe_kernel(behaviour, 8))
    out = subprocess.run(
        ["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", "-M", "intel",
         f"--adjust-vma={probe.PROBE_LOAD_ADDRESS:#x}", f"--start-address={labels['_start']:#x}",
         f"--stop-address={labels['ready_msg']:#x}", str(raw)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    decoded = {
        int(m.group(1), 16): _operands(m.group(2))
        for m in re.finditer(r"^ *([0-9a-f]+):\t(?:[0-9a-f]{2} )+ *\t\w+[ \t]*(.*)$", out, re.M)
    }
    checked = 0
    for addr, mnemonic, operands in insns:
        if mnemonic in ("lodsb", "repne") or any(re.search(rf"\b{n}\b", operands) for n in labels):
            continue  # string instructions are spelled differently; targets checked above
        assert decoded[addr] == _operands(operands), (hex(addr), mnemonic, operands)
        checked += 1
    assert checked >= 10
    if behaviour is ProbeBehaviour.CMDLINE:
        assert "mov    esi,DWORD PTR [rbp+0x228]" in out
        assert "repnz scas al,BYTE PTR es:[rdi]" in out


@pytest.mark.parametrize("bad", [-1, MAX_TOUCH_MIB + 1, True, 1.5, "8"])
def test_bad_touch_is_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="touch_mib"):
        build_probe_kernel(ProbeBehaviour.HALT, bad)  # type: ignore[arg-type]


def test_bad_behaviour_is_config_error() -> None:
    with pytest.raises(ConfigError, match="behaviour"):
        build_probe_kernel("halt")  # type: ignore[arg-type]


def test_max_touch_is_accepted() -> None:
    assert b"TOUCHED 1008\n" in build_probe_kernel(ProbeBehaviour.HALT, MAX_TOUCH_MIB)


def test_boot_args() -> None:
    assert PROBE_BOOT_ARGS == "console=ttyS0 reboot=k panic=1 pci=off"


# --------------------------------------------------------------------------- files


def test_write_is_atomic_and_world_readable(tmp_path: Path) -> None:
    target = tmp_path / "probe.elf"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        result = write_probe_kernel(target, ProbeBehaviour.SPIN, 2)
    finally:
        os.umask(old_umask)
    assert result == target
    assert target.read_bytes() == build_probe_kernel(ProbeBehaviour.SPIN, 2)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.elf"]  # no temp file left


def test_write_into_missing_directory_is_staging_error(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="missing"):
        write_probe_kernel(tmp_path / "missing" / "probe.elf")
    assert list(tmp_path.iterdir()) == []


def test_write_bad_input_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        write_probe_kernel(tmp_path / "probe.elf", touch_mib=-5)
    assert list(tmp_path.iterdir()) == []


def test_cache_path_name_and_reuse(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "probe"  # created on demand
    path = probe_kernel_path(ProbeBehaviour.HALT, 64, cache_dir=cache)
    image = build_probe_kernel(ProbeBehaviour.HALT, 64)
    digest = hashlib.sha256(image).hexdigest()[:16]
    assert path.parent == cache
    assert path.name == f"ironclaw-probe-halt-touch64-{digest}.elf"
    assert path.read_bytes() == image
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

    inode = path.stat().st_ino
    assert probe_kernel_path(ProbeBehaviour.HALT, 64, cache_dir=cache) == path
    assert path.stat().st_ino == inode  # reused, not rewritten

    others = {probe_kernel_path(b, t, cache_dir=cache) for b, t in ALL_VARIANTS}
    assert len(others) == len(ALL_VARIANTS)
    assert path in others
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp files


def test_cache_rewrites_corrupted_file(tmp_path: Path) -> None:
    path = probe_kernel_path(ProbeBehaviour.RESET, cache_dir=tmp_path)
    path.write_bytes(b"truncated")
    assert probe_kernel_path(ProbeBehaviour.RESET, cache_dir=tmp_path) == path
    assert path.read_bytes() == build_probe_kernel(ProbeBehaviour.RESET)


def test_cache_ignores_files_from_other_builds(tmp_path: Path) -> None:
    stale = tmp_path / "ironclaw-probe-reset-touch0-0000000000000000.elf"
    stale.write_bytes(b"built by an older version")
    path = probe_kernel_path(ProbeBehaviour.RESET, cache_dir=tmp_path)
    assert path != stale
    assert path.read_bytes() == build_probe_kernel(ProbeBehaviour.RESET)


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRONCLAW_CACHE_DIR", str(tmp_path / "env-cache"))
    path = probe_kernel_path(ProbeBehaviour.SPIN)
    assert path.parent == tmp_path / "env-cache"


def test_cache_falls_back_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    monkeypatch.delenv("IRONCLAW_CACHE_DIR", raising=False)
    monkeypatch.setattr(probe, "DEFAULT_CACHE_DIR", blocker / "probe")  # cannot be created
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = probe_kernel_path(ProbeBehaviour.HALT)
    assert path.parent == tmp_path / "home" / ".cache" / "ironclaw" / "probe"
    assert path.read_bytes() == build_probe_kernel(ProbeBehaviour.HALT)


def test_unusable_explicit_cache_dir_is_staging_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StagingError, match="cache"):
        probe_kernel_path(cache_dir=blocker / "probe")


# --------------------------------------------------------------------------- counter


def test_count_line_is_the_counter_in_ram() -> None:
    image = build_probe_kernel(ProbeBehaviour.COUNT)
    line = f"{COUNT_PREFIX} {'0' * 10}\n".encode()
    assert image.count(line) == 1
    assert image.endswith(line)  # the digits are the last bytes, incremented in place
    assert b"\x0f\x31" in image  # rdtsc
    assert b"\x48\x3d" + struct.pack("<I", DEFAULT_COUNT_TICKS) in image  # cmp rax, ticks
    assert b"\xfe\x07\x80\x3f\x3a" in image  # inc byte [rdi]; cmp byte [rdi], '9' + 1
    assert b"\xb0\xfe\xe6\x64" not in image and b"\xfa\xf4" not in image  # never stops


def test_count_ticks_change_only_the_wait() -> None:
    fast = build_probe_kernel(ProbeBehaviour.COUNT, count_ticks=1000)
    slow = build_probe_kernel(ProbeBehaviour.COUNT, count_ticks=2**31 - 1)
    assert len(fast) == len(slow)
    assert b"\x48\x3d" + struct.pack("<I", 1000) in fast
    assert sum(a != b for a, b in zip(fast, slow, strict=True)) <= 4


def test_count_listing_labels() -> None:
    listing = probe_listing(ProbeBehaviour.COUNT)
    for text in ("count_loop:", "jb count_wait", "jne count_loop", "jmp count_carry"):
        assert text in listing


@pytest.mark.parametrize("bad", [0, -5, 2**31, True, 1.0])
def test_bad_count_ticks_is_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="count_ticks"):
        build_probe_kernel(ProbeBehaviour.COUNT, count_ticks=bad)  # type: ignore[arg-type]


def _emulate_increment(digits: bytearray) -> None:
    """What the carry loop does, step by step as encoded: inc, compare, wrap, move left."""
    i = len(digits) - 1
    while True:
        digits[i] += 1
        if digits[i] != 0x3A:
            return
        digits[i] = 0x30
        i -= 1


def test_parse_counts_whole_lines_only() -> None:
    digits = bytearray(b"0000000098")
    text = ""
    for _ in range(4):
        text += f"{COUNT_PREFIX} {digits.decode()}\n"
        _emulate_increment(digits)
    text += f"{COUNT_PREFIX} 00000"  # cut off mid-line
    assert parse_counts(f"garbage\n{READY_LINE}\n" + text) == [98, 99, 100, 101]
    assert parse_counts("CONT 0000000001\n") == []


def test_count_cache_name_depends_on_ticks(tmp_path: Path) -> None:
    a = probe_kernel_path(ProbeBehaviour.COUNT, cache_dir=tmp_path)
    b = probe_kernel_path(ProbeBehaviour.COUNT, cache_dir=tmp_path, count_ticks=1000)
    assert a != b and a.name.startswith("ironclaw-probe-count-touch0-")


# --------------------------------------------------------------------------- command line


def test_cmdline_probe_reads_the_command_line_pointer_of_boot_params() -> None:
    image = build_probe_kernel(ProbeBehaviour.CMDLINE)
    code = image[64 + 56 :]
    assert code.startswith(b"\xfc\x48\x89\xf5")  # cld; mov rbp, rsi (before rsi is reused)
    assert b"\x8b\xb5" + struct.pack("<I", 0x228) in code  # mov esi, [rbp + 0x228]
    assert b"\xf2\xae" in code  # repne scasb: the NUL that ends it
    assert image.count(f"{CMDLINE_PREFIX} ".encode()) == 1
    assert b"\xb0\xfe\xe6\x64" in image  # then resets: the VMM exits by itself
    for other in ProbeBehaviour:
        if other is not ProbeBehaviour.CMDLINE:
            assert b"\x48\x89\xf5" not in build_probe_kernel(other)[64 + 56 :][:8]
            assert CMDLINE_PREFIX.encode() not in build_probe_kernel(other)


def test_parse_cmdline_whole_lines_only() -> None:
    console = f"{READY_LINE}\n{CMDLINE_PREFIX} console=ttyS0 ip=10.0.0.2::10.0.0.1\r\nrest"
    assert parse_cmdline(console) == "console=ttyS0 ip=10.0.0.2::10.0.0.1"
    assert parse_cmdline(f"{CMDLINE_PREFIX} cut off mid-li") is None
    assert parse_cmdline(f"{READY_LINE}\n") is None
    assert parse_cmdline(f"{CMDLINE_PREFIX} \n") == ""


def test_flood_prints_count_lines_without_waiting() -> None:
    image = build_probe_kernel(ProbeBehaviour.FLOOD)
    line = f"{COUNT_PREFIX} {'0' * 10}\n".encode()
    assert image.endswith(line)  # the same in-RAM counter line as COUNT ...
    assert b"\x0f\x31" not in image  # ... but no rdtsc busy-wait between lines
    assert b"\xfe\x07\x80\x3f\x3a" in image  # inc byte [rdi]; cmp byte [rdi], '9' + 1
    assert b"\xb0\xfe\xe6\x64" not in image and b"\xfa\xf4" not in image  # never stops
    listing = probe_listing(ProbeBehaviour.FLOOD)
    assert "count_loop:" in listing and "count_wait" not in listing
    assert build_probe_kernel(ProbeBehaviour.FLOOD, count_ticks=5) == image  # no wait to tune
