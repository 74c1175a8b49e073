"""Check that the staged binaries are the release they claim to be, before anything is committed.

An archive's member names prove nothing: a shell script named ``firecracker``, a jailer that
is really a firecracker binary, or binaries of another release would otherwise be installed
and reported as the requested release. So each staged file must be an ELF executable for the
target architecture, and (when that is this host's) running it with ``--version``, from the
staging location, must print its own banner and the requested release; both must agree.

``--version`` runs without a shell, with a minimal environment, no stdin, in a new session,
under a timeout and with its output capped; whatever it started is killed with it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import pidfd
from ..errors import InstallError
from .release import RELEASES_PAGE, _Plan, host_arch

if TYPE_CHECKING:
    from ..vm.binaries import Version

#: How long ``--version`` may take (a release binary answers in milliseconds).
VERSION_TIMEOUT_S = 10.0
#: More output than this is not a release binary's ``--version``.
MAX_OUTPUT_BYTES = 64 * 1024
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
#: ELF ``e_machine`` of each architecture Firecracker publishes binaries for.
_ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
_ELF_TYPES = {2, 3}  # ET_EXEC, ET_DYN (static-pie)


@dataclass(frozen=True, slots=True)
class Staged:
    """One staged binary: which program it must be, where it is, where it came from."""

    program: str  # "firecracker" | "jailer"
    path: Path
    member: str


class _Refused(Exception):
    """Internal: what is wrong with one file (turned into an InstallError with the fix)."""


def verify_staged(
    plan: _Plan, archive: str, staged: list[Staged], check_cancel: Callable[[], None]
) -> list[str]:
    """Refuse (``InstallError``) unless every staged file is the requested release's program.

    Returns notes for the result (e.g. that ``--version`` could not run for a foreign arch).
    ``check_cancel`` is called while waiting and raises to abandon the check.
    """
    from ..vm.binaries import Version  # the one home of version parsing (imported late: heavy)

    fix = (
        f"build the archive from one Firecracker release's firecracker and jailer binaries "
        f"(or use the official archive from {RELEASES_PAGE})"
    )
    for item in staged:
        try:
            _check_elf(item.path, plan.arch)
        except _Refused as exc:
            raise _refusal(archive, item, str(exc), fix) from None
    if plan.arch != host_arch():
        return [
            f"--version was not run: the binaries are for {plan.arch}, this host is "
            f"{host_arch()}; run `firecracker --version` and `jailer --version` on the target"
        ]
    versions: dict[str, Version] = {}
    for item in staged:
        try:
            versions[item.program] = _reported_version(item, check_cancel)
        except _Refused as exc:
            raise _refusal(archive, item, str(exc), fix) from None
    fc, jailer = versions["firecracker"], versions["jailer"]
    members = {item.program: item.member for item in staged}
    if fc.release != jailer.release:
        raise InstallError(
            f"refusing archive {archive}: {members['firecracker']} reports {fc} but "
            f"{members['jailer']} reports {jailer}; firecracker and jailer must come from the "
            f"same release; nothing was installed: {fix}"
        )
    wanted = Version.parse(plan.version)
    if fc.release != wanted.release:
        reported = "v{}.{}.{}".format(*fc.release)
        raise InstallError(
            f"refusing archive {archive}: it is labelled {plan.version} but its binaries "
            f"({members['firecracker']}, {members['jailer']}) report {fc}; nothing was "
            f"installed: use the real {plan.version} archive from "
            f"{RELEASES_PAGE}, or to install {reported} an archive built for it (release-"
            f"{reported}-{plan.arch}/...) with --version {reported}"
        )
    return []


def _refusal(archive: str, item: Staged, what: str, fix: str) -> InstallError:
    return InstallError(
        f"refusing archive {archive}: {item.member} is not a {item.program} release binary: "
        f"{what}; nothing was installed: {fix}"
    )


def _check_elf(path: Path, arch: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"#!"):
        first = head.split(b"\n", 1)[0].decode(errors="replace")
        raise _Refused(f"it is a script ({first!r})")
    if not head.startswith(b"\x7fELF"):
        raise _Refused(f"it is not an ELF executable (it starts with {head[:16]!r})")
    if len(head) < 20 or head[4] != 2 or head[5] != 1:  # ELFCLASS64, little-endian
        raise _Refused("it is not a 64-bit little-endian ELF file")
    e_type = int.from_bytes(head[16:18], "little")
    e_machine = int.from_bytes(head[18:20], "little")
    if e_machine != _ELF_MACHINES[arch]:
        names = {v: k for k, v in _ELF_MACHINES.items()}
        built_for = names.get(e_machine, f"ELF machine {e_machine}")
        raise _Refused(f"it is built for {built_for}, not {arch}")
    if e_type not in _ELF_TYPES:
        raise _Refused(f"it is an ELF file of type {e_type}, not an executable")


def _reported_version(item: Staged, check_cancel: Callable[[], None]) -> Version:
    from ..vm.binaries import VERSION_BANNERS, parse_version_output

    status, output = _run_version(item.path, check_cancel)
    try:
        version = parse_version_output(item.program, output)
    except ValueError as exc:
        # Say so when it is the other program (e.g. a firecracker binary named jailer).
        for other in VERSION_BANNERS:
            if other != item.program:
                with contextlib.suppress(ValueError):
                    found = parse_version_output(other, output)
                    banner = VERSION_BANNERS[other]
                    raise _Refused(
                        f"its --version says it is {other} ('{banner} {found}')"
                    ) from None
        raise _Refused(f"`--version` printed no {item.program} version ({exc})") from None
    if status != 0:
        raise _Refused(f"`--version` exited with status {status} (after printing {version})")
    return version


def _run_version(path: Path, check_cancel: Callable[[], None]) -> tuple[int, str]:
    """Run ``path --version``; return (exit status, output). Kills its process group after."""
    deadline = time.monotonic() + VERSION_TIMEOUT_S
    try:
        proc = subprocess.Popen(
            [str(path), "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_ENV,
            cwd="/",
            start_new_session=True,
        )
    except OSError as exc:
        hint = ""
        if exc.errno == 13:  # EACCES: a noexec mount
            hint = f" (is {path.parent} on a noexec mount? choose another --prefix)"
        raise _Refused(f"it cannot be executed: {exc.strerror or exc}{hint}") from None
    assert proc.stdout is not None
    output = bytearray()
    try:
        with pidfd.opened(proc.pid) as fd:  # our unreaped child: its pid cannot be recycled
            try:
                poller = select.poll()
                poller.register(proc.stdout.fileno(), select.POLLIN)
                while len(output) <= MAX_OUTPUT_BYTES:
                    check_cancel()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _Refused(
                            f"`--version` did not finish within {VERSION_TIMEOUT_S:g} s (killed)"
                        )
                    if poller.poll(min(left, 0.1) * 1000):
                        chunk = os.read(proc.stdout.fileno(), 65536)
                        if not chunk:
                            break
                        output += chunk
                else:
                    raise _Refused(f"`--version` printed more than {MAX_OUTPUT_BYTES} bytes")
                while fd is not None and not pidfd.wait_exit(fd, 0.1):
                    check_cancel()
                    if time.monotonic() > deadline:
                        raise _Refused(
                            f"`--version` did not exit within {VERSION_TIMEOUT_S:g} s (killed)"
                        )
            finally:
                # Before reaping, so the group id is still this child's: strays die too.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        proc.stdout.close()
    return proc.returncode, output.decode(errors="replace")
