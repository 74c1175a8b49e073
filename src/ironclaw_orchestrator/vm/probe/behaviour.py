"""What the probe guest does and prints: its behaviours, console lines and boot contract.

The lines are the probe's interface to tests and tools (:func:`parse_counts`,
:func:`parse_cmdline` read them back); the code that prints them is in :mod:`.program`.
"""

from __future__ import annotations

import enum

#: The first line the probe prints on its serial console (followed by ``"\n"``).
READY_LINE = "IRONCLAW-PROBE-READY"
#: The line printed after the memory touch, followed by ``" <touch_mib>\n"``.
TOUCHED_PREFIX = "IRONCLAW-PROBE-TOUCHED"
#: Each line a counting probe prints: this, a space, ten decimal digits, ``"\n"``.
COUNT_PREFIX = "IRONCLAW-PROBE-COUNT"
_COUNT_DIGITS = 10
#: The line a CMDLINE probe prints: this, a space, its kernel command line, ``"\n"``.
CMDLINE_PREFIX = "IRONCLAW-PROBE-CMDLINE"
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


def parse_cmdline(console: str) -> str | None:
    """The command line a CMDLINE probe printed on ``console`` (a whole line), or ``None``."""
    prefix = CMDLINE_PREFIX + " "
    for line in console.split("\n")[:-1]:
        if line.startswith(prefix):
            return line[len(prefix) :].rstrip("\r")
    return None


def _count_len() -> int:
    return len(COUNT_PREFIX) + 1 + _COUNT_DIGITS + 1


def parse_counts(console: str) -> list[int]:
    """The counter values in a counting probe's console output, in order (whole lines only)."""
    prefix = COUNT_PREFIX + " "
    values = []
    for line in console.split("\n")[:-1]:  # the last piece may be a line still being written
        if line.startswith(prefix) and len(line) == _count_len() - 1 and line[-10:].isdigit():
            values.append(int(line[len(prefix) :]))
    return values
