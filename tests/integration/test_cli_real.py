"""The real ``ironclaw`` CLI against real firecracker + jailer, booting the probe guest.

Each test runs the CLI as a subprocess with a unique VM id and then asserts that nothing
carrying that id is left on the host (jail dir, run dir, netns, cgroup dirs). A subprocess
that is still running when a test fails is killed, and any leftover is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from leftovers import leftovers

from ironclaw_orchestrator.vm.probe import READY_LINE

DEADLINE_S = 60.0
CLI = [sys.executable, "-m", "ironclaw_orchestrator.cli"]
JAIL_BASE = Path("/var/jail")
RUN_DIR = Path("/run/ironclaw/vms")
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    for name in ("firecracker", "jailer"):
        if shutil.which(name) is None and not os.path.exists(f"/usr/local/bin/{name}"):
            return f"{name} not found"
    return None


_REASON = _skip_reason()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_REASON is not None, reason=f"real CLI tests: {_REASON}"),
]


def _remove(entry: str) -> None:
    """Remove one :func:`leftovers` entry that names a path (processes are the guard's)."""
    kind, _, rest = entry.partition(" /")
    if kind not in ("jail dir", "run dir", "cgroup", "netns", "registry record"):
        return
    p = Path("/" + rest)
    if p.is_relative_to(CGROUP_ROOT):
        for child in sorted(p.rglob("*"), reverse=True):
            if child.is_dir():
                child.rmdir()
        p.rmdir()
    elif p.is_relative_to(NETNS_DIR):
        subprocess.run(["ip", "netns", "delete", p.name], check=False)
    elif p.is_file():
        p.unlink()
    else:
        shutil.rmtree(p, ignore_errors=True)


@pytest.fixture
def vm_id() -> Iterator[str]:
    """A unique id; whatever is left with it afterwards fails the test and is removed."""
    ident = f"it-cli-{secrets.token_hex(5)}"
    yield ident
    left = leftovers(ident)
    for path in left:
        with contextlib.suppress(OSError):
            _remove(path)
    assert not left, f"left behind: {left}"


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=DEADLINE_S, check=False
    )


def test_vm_run_probe_exits_zero(vm_id: str) -> None:
    result = run_cli("vm", "run", "--id", vm_id, "--stats")
    assert result.returncode == 0, result.stderr
    assert READY_LINE in result.stdout
    assert "memory_peak_bytes" in result.stderr
    assert not leftovers(vm_id)


def _wait_for(proc: subprocess.Popen[bytes], path: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not path.exists():
        assert proc.poll() is None, "the CLI ended before the VM was up"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_vm_run_halt_interrupted(
    vm_id: str, procs: list[subprocess.Popen[bytes]], sig: signal.Signals, code: int
) -> None:
    proc = subprocess.Popen(
        [*CLI, "vm", "run", "--id", vm_id, "--probe", "halt"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.append(proc)
    console = RUN_DIR / vm_id / "console.log"
    _wait_for(proc, console)
    deadline = time.monotonic() + DEADLINE_S
    while READY_LINE.encode() not in console.read_bytes():
        assert time.monotonic() < deadline, "the probe never printed its ready line"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == code, err.decode()
    assert READY_LINE in out.decode()
    assert "Traceback" not in err.decode()
    assert not leftovers(vm_id)


def test_vm_run_stops_and_cleans_up_when_stdout_is_closed(vm_id: str) -> None:
    """``ironclaw vm run | head -1`` after head exited: the console copy fails with EPIPE,
    and the VM is stopped and removed (exit 141), not left running with nothing reading."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [*CLI, "vm", "run", "--id", vm_id, "--probe", "halt"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=DEADLINE_S,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert "stdout closed: stopping VM" in result.stderr
    assert "Traceback" not in result.stderr
    assert not leftovers(vm_id)


def test_doctor_json_live_passes() -> None:
    result = run_cli("doctor", "--json")
    doc = json.loads(result.stdout)
    failed = [c for c in doc["checks"] if c["status"] == "fail"]
    assert result.returncode == 0, failed
    live = next(c for c in doc["checks"] if c["name"] == "live boot (jailed)")
    assert live["status"] == "pass"
    assert live["details"]["sandboxed"] is True
    assert live["details"]["exit_code"] == 0
    for key in ("spawn_to_api_ready_ms", "start_to_ready_line_ms", "stop_cleanup_ms"):
        assert live["details"][key] >= 0
    assert not leftovers(live["details"]["vm_id"])


def test_vm_run_no_jailer_warns(vm_id: str) -> None:
    result = run_cli("vm", "run", "--no-jailer", "--id", vm_id, "--stats")
    assert result.returncode == 0, result.stderr
    assert READY_LINE in result.stdout
    assert "UNSANDBOXED" in result.stderr
    assert "stats unavailable" in result.stderr
    assert not any(JAIL_BASE.glob(f"*/{vm_id}"))


def test_vm_run_no_jailer_refused_when_sandbox_required(vm_id: str) -> None:
    result = subprocess.run(
        [*CLI, "vm", "run", "--no-jailer", "--id", vm_id],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env={**os.environ, "IRONCLAW_REQUIRE_SANDBOX": "1"},
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "contradicts the sandbox requirement" in result.stderr
