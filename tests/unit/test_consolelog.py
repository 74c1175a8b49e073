"""The console byte budget: rotation, marker, dropped counter, tail and follower, the pipe."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

import pytest

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm.config import (
    DEFAULT_CONSOLE_LIMIT_BYTES,
    MAX_CONSOLE_LIMIT_BYTES,
    MIN_CONSOLE_LIMIT_BYTES,
    VmConfig,
)
from ironclaw_orchestrator.vm.consolelog import (
    MARKER_PREFIX,
    ConsoleLog,
    ConsolePump,
    marker_line,
    rotated_path,
)
from ironclaw_orchestrator.vm.consoleread import (
    SKIPPED_NOTE,
    ConsoleFollower,
    dropped_bytes,
    read_tail,
)
from ironclaw_orchestrator.vm.process import ChildProcess

LIMIT = MIN_CONSOLE_LIMIT_BYTES  # 16 KiB: segments of about 8 KiB


def on_disk(path: Path) -> int:
    """Every file of the console (tmp files of a rotation too)."""
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def kept(path: Path) -> bytes:
    """``console.log.1`` without its marker, then ``console.log``."""
    old = rotated_path(path)
    data = old.read_bytes() if old.exists() else b""
    if data.startswith(MARKER_PREFIX.encode()):
        data = data.split(b"\n", 1)[1]
    return data + path.read_bytes()


def lines(start: int, count: int) -> bytes:
    return b"".join(b"line %08d\n" % n for n in range(start, start + count))


def test_stays_within_budget_and_keeps_the_newest_bytes(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path, LIMIT)
    rng = random.Random(7)
    stream = bytearray()
    for i in range(300):
        # Mostly small writes, some larger than a segment (a flood read in one go).
        size = rng.choice([1, 17, 300, 4096, 9000, 40000])
        data = bytes((i + k) % 251 for k in range(size))
        log.write(data)
        stream += data
        assert on_disk(path) <= LIMIT
        retained = kept(path)
        assert bytes(stream).endswith(retained)
        assert log.dropped == len(stream) - len(retained)
    assert log.rotations > 10 and log.dropped > 0
    log.close()


def test_marker_line_says_where_and_how_much_was_dropped(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path, LIMIT)
    log.write(lines(0, 500))  # 6500 bytes: fits in the first segment
    assert not rotated_path(path).exists() and log.dropped == 0
    log.write(lines(500, 500))  # first rotation: nothing dropped yet, no marker
    assert log.rotations == 1 and log.dropped == 0
    assert rotated_path(path).read_bytes().startswith(b"line 00000000\n")
    assert dropped_bytes(path) == 0
    log.write(lines(1000, 1000))  # more rotations: the oldest segments go
    first = rotated_path(path).read_bytes().split(b"\n", 1)[0] + b"\n"
    assert first == marker_line(log.dropped, LIMIT, log.rotations)
    assert f"console_limit_bytes={LIMIT}".encode() in first and log.dropped > 0
    assert dropped_bytes(path) == log.dropped  # another process reads it from the files
    assert lines(0, 2000).endswith(kept(path))
    log.close()


def test_rotation_gives_console_log_a_new_inode(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path, LIMIT)
    log.write(b"x" * 100)
    before = path.stat().st_ino
    with open(path, "rb") as held:
        log.write(b"y" * log.segment)
        assert path.stat().st_ino != before
        assert held.read() == b"x" * 100 + b"y" * (log.segment - 100)  # complete, unlinked
    log.close()


def test_a_write_that_fails_is_counted_as_dropped(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path, LIMIT)
    log.write(b"a" * 10)
    os.close(log._fd)  # type: ignore[arg-type]  # the file can no longer be written
    log._fd = os.open(os.devnull, os.O_RDONLY)
    log.write(b"b" * 99)
    assert log.dropped == 99
    log.close()


@pytest.mark.parametrize("limit", [0, MIN_CONSOLE_LIMIT_BYTES - 1, MAX_CONSOLE_LIMIT_BYTES + 1])
def test_console_log_refuses_a_budget_out_of_range(tmp_path: Path, limit: int) -> None:
    with pytest.raises(ValueError, match="console_limit_bytes"):
        ConsoleLog(tmp_path / "console.log", limit)


def test_config_key_default_bounds_and_strictness() -> None:
    assert VmConfig().console_limit_bytes == DEFAULT_CONSOLE_LIMIT_BYTES == 4 << 20
    assert VmConfig(console_limit_bytes=65536).console_limit_bytes == 65536
    for bad in (MIN_CONSOLE_LIMIT_BYTES - 1, MAX_CONSOLE_LIMIT_BYTES + 1, True, "4MiB", 1.5):
        with pytest.raises(ConfigError, match="console_limit_bytes"):
            VmConfig(console_limit_bytes=bad)  # type: ignore[arg-type]


def test_cli_console_limit_flag_parses_sizes() -> None:
    from ironclaw_orchestrator.cli.common import parse_console_limit

    assert parse_console_limit(None) is None
    assert parse_console_limit("64KiB") == 65536
    assert parse_console_limit("4MiB") == 4 << 20
    with pytest.raises(ConfigError, match="--console-limit"):
        parse_console_limit("lots")


# --------------------------------------------------------------------------- reading


def test_tail_reaches_into_the_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path, LIMIT)
    log.write(lines(0, 2000))
    log.write(b"last words\n")
    while path.stat().st_size > 20:  # make console.log hold little after a rotation
        log.write(b"z" * log.segment)
        log.write(b"\nlast words\n")
    tail = read_tail(path, 3)
    assert tail.endswith("last words") and len(tail.splitlines()) == 3
    assert read_tail(tmp_path / "missing.log") == "" and read_tail(None) == ""
    log.close()


def test_follower_follows_across_rotations_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path, LIMIT)
    follower = ConsoleFollower(path)
    stream = bytearray()
    seen = bytearray()
    for n in range(0, 3000, 100):  # a read at least once per rotation
        chunk = lines(n, 100)
        log.write(chunk)
        stream += chunk
        seen += follower.read()
    seen += follower.read()
    assert log.rotations > 3
    assert bytes(seen) == bytes(stream)
    follower.close()
    log.close()


def test_follower_started_late_begins_at_the_oldest_kept_byte(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path, LIMIT)
    log.write(lines(0, 3000))
    follower = ConsoleFollower(path)
    got = follower.read(1 << 30)
    marker = rotated_path(path).read_bytes().split(b"\n", 1)[0] + b"\n"
    assert got == marker + kept(path)  # the marker shows where older output went
    follower.close()
    log.close()


def test_follower_says_when_output_rotated_away_unread(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path, LIMIT)
    follower = ConsoleFollower(path)
    assert follower.read() == b""
    log.write(b"a" * 100)
    assert follower.read() == b"a" * 100
    # Two rotations: our segment is finished and the next one sits in console.log.1.
    log.write(b"b" * (2 * log.segment) + b"tail")
    assert log.rotations == 2
    assert follower.read() == b"b" * (2 * log.segment) + b"tail"
    # Three more at once: a segment is gone before the follower could read it.
    log.write(b"c" * (3 * log.segment) + b"end")
    got = follower.read()
    assert SKIPPED_NOTE in got and got.endswith(b"c" * log.segment + b"end")
    follower.close()
    log.close()


def test_follower_of_a_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.log"
    follower = ConsoleFollower(path)
    assert follower.read() == b""  # not there yet
    path.write_bytes(b"one\n")
    assert follower.read() == b"one\n"
    with open(path, "ab") as f:
        f.write(b"two\n")
    assert follower.read() == b"two\n" and follower.read() == b""
    follower.close()


# --------------------------------------------------------------------------- the terminal


def test_pump_takes_a_childs_output_within_budget(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    total = 200_000
    code = (
        "import os\n"
        f"data = b''.join(b'line %08d\\n' % n for n in range({total} // 14))\n"
        "os.set_blocking(1, True)\n"
        "os.write(2, b'from stderr\\n')\n"
        "view = memoryview(data)\n"
        "while view:\n"
        "    view = view[os.write(1, view):]\n"
    )

    async def run() -> ConsolePump:
        pump = ConsolePump(path, LIMIT)
        proc = ChildProcess.spawn([sys.executable, "-c", code], stdout_fd=pump.write_fd)
        pump.child_started()
        pump.attach()
        assert await proc.wait(30) == 0
        pump.close()
        return pump

    pump = asyncio.run(run())
    assert on_disk(path) <= LIMIT
    written = total // 14 * 14 + len(b"from stderr\n")
    assert pump.dropped == written - len(kept(path)) > 0
    assert kept(path).endswith(b"line %08d\n" % (total // 14 - 1))


def test_a_full_console_drops_instead_of_blocking_the_writer(tmp_path: Path) -> None:
    """Nobody reads (the owner's loop is busy): the child's writes fail with EAGAIN at once,
    so a VMM never stalls on its console."""
    code = (
        "import os, time\n"
        "ok = failed = 0\n"
        "end = time.monotonic() + 0.5\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        "        ok += os.write(1, b'x' * 4096)\n"
        "    except BlockingIOError:\n"
        "        failed += 1\n"
        "print(ok, failed, file=open(os.environ['OUT'], 'w'))\n"
    )
    out = tmp_path / "counts"

    async def run() -> None:
        pump = ConsolePump(tmp_path / "console.log", LIMIT)  # never attached
        proc = ChildProcess.spawn(
            [sys.executable, "-c", code], stdout_fd=pump.write_fd, env={"OUT": str(out)}
        )
        pump.child_started()
        assert await proc.wait(30) == 0
        pump.close()

    asyncio.run(run())
    ok, failed = map(int, out.read_text().split())
    assert ok <= 1 << 20 and failed > 0  # the buffer filled, then writes failed at once


def test_when_the_reader_is_gone_writes_fail_without_a_signal(tmp_path: Path) -> None:
    """The owner died: the VMM's writes fail with EIO (a pipe would raise SIGPIPE, whose
    handler kills Firecracker v1.0.0), and the raw terminal passes bytes unchanged."""
    go, out = tmp_path / "go", tmp_path / "result"
    code = (
        "import errno, os, signal, time\n"
        "signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a VMM without a handler\n"
        "os.write(1, b'a\\nb\\n')\n"
        "while not os.path.exists(os.environ['GO']):\n"
        "    time.sleep(0.01)\n"
        "try:\n"
        "    os.write(1, b'after\\n')\n"
        "    result = 'written'\n"
        "except OSError as exc:\n"
        "    result = errno.errorcode[exc.errno]\n"
        "open(os.environ['OUT'], 'w').write(result)\n"
    )

    async def run() -> int:
        pump = ConsolePump(tmp_path / "console.log", LIMIT)
        proc = ChildProcess.spawn(
            [sys.executable, "-c", code],
            stdout_fd=pump.write_fd,
            env={"GO": str(go), "OUT": str(out)},
        )
        pump.child_started()
        pump.attach()
        while b"b" not in (tmp_path / "console.log").read_bytes():
            await asyncio.sleep(0.01)
        pump.close()  # the reader goes away while the child runs
        go.touch()
        return await proc.wait(30)

    assert asyncio.run(run()) == 0  # not killed by a signal
    assert out.read_text() == "EIO"
    assert (tmp_path / "console.log").read_bytes() == b"a\nb\n"


def test_tail_takes_in_what_is_still_in_the_pipe(tmp_path: Path) -> None:
    path = tmp_path / "console.log"

    async def run() -> str:
        pump = ConsolePump(path, LIMIT)
        os.write(pump.write_fd, b"Jailer error: something\n")  # unread: no loop attached
        tail = read_tail(path)
        pump.close()
        return tail

    assert asyncio.run(run()) == "Jailer error: something"
