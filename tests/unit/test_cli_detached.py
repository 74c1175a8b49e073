"""``ironclaw vm start|ls|stats|logs|stop`` and ``ironclaw gc`` through CliRunner.

No root, no VMs: a private state directory holds fake records; the supervisor and gc are
replaced where they would touch the host.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from ironclaw_orchestrator import gc as gc_lib
from ironclaw_orchestrator.cli import app
from ironclaw_orchestrator.cli import detached as detached_cli
from ironclaw_orchestrator.cli import gc as gc_cli
from ironclaw_orchestrator.cli import vm_stop as vm_stop_cli
from ironclaw_orchestrator.cli.records import format_duration
from ironclaw_orchestrator.errors import RegistryError
from ironclaw_orchestrator.registry import STATE_DIR_ENV, Registry, VmRecord, read_process_start
from ironclaw_orchestrator.vm.config import VmConfig
from ironclaw_orchestrator.vm.probe import ProbeBehaviour, probe_kernel_path

runner = CliRunner()


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe kernels in a private cache; the state dir env restored after each test (the
    CLI's --state-dir sets it in this process)."""
    monkeypatch.setenv("IRONCLAW_CACHE_DIR", str(tmp_path / "probe-cache"))
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "unused-state"))
    monkeypatch.delenv("IRONCLAW_REQUIRE_SANDBOX", raising=False)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def reg(state: Path) -> Registry:
    return Registry(state)


def invoke(state: Path, *args: str) -> Result:
    return runner.invoke(app, ["--state-dir", str(state), *args], env={"COLUMNS": "200"})


def own_start() -> int:
    start = read_process_start(os.getpid())
    assert start is not None
    return start


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def add_record(
    reg: Registry, vm_id: str, *, alive: bool = True, detached: bool = True, **fields: Any
) -> VmRecord:
    """A fake record owned by this (live) process or by a dead one."""
    owner = (
        {"owner_pid": os.getpid(), "owner_start_time": own_start()}
        if alive
        else {"owner_pid": dead_pid(), "owner_start_time": 1}
    )
    return reg.claim(vm_id, detached=detached, **owner, **fields)


def fake_cgroups(tmp_path: Path, vm_id: str, files: dict[str, str]) -> dict[str, Any]:
    """``VmCgroups.to_dict()`` of a v2 VM whose cgroup directory is a plain tmp directory."""
    mount = tmp_path / "cgroup"
    cg = mount / "ironclaw" / vm_id
    cg.mkdir(parents=True)
    for name, text in files.items():
        (cg / name).write_text(text)
    return {
        "format": 1,
        "version": 2,
        "vm_id": vm_id,
        "parent": "ironclaw",
        "explicit_parent": False,
        "settings": [],
        "mounts": {"unified": str(mount)},
        "own": {"unified": ""},
        "controllers": ["cpu", "memory"],
        "attach_keys": [],
        "lock_path": str(tmp_path / "cg.lock"),
        "created": [str(cg)],
        "prepared": True,
    }


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "argv",
    [
        ["vm", "start"],
        ["vm", "ls"],
        ["vm", "stats"],
        ["vm", "logs"],
        ["vm", "stop"],
        ["gc"],
    ],
    ids=lambda a: "-".join(a),
)
def test_help_has_examples(argv: list[str]) -> None:
    result = runner.invoke(app, [*argv, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples" in result.output and "Traceback" not in result.output


def test_root_help_lists_state_dir_and_gc() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "--state-dir" in result.output and "gc" in result.output


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 59, 61, 3599, 3661, 90000)] == [
        "0s",
        "59s",
        "1m01s",
        "59m59s",
        "1h01m",
        "1d01h",
    ]


# --------------------------------------------------------------------------- ls


def test_state_dir_option_sets_the_environment(state: Path) -> None:
    result = invoke(state, "vm", "ls", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    assert os.environ[STATE_DIR_ENV] == str(state)
    assert state.is_dir()


def test_ls_json_and_table(state: Path, reg: Registry) -> None:
    add_record(
        reg,
        "vm-a",
        state="running",
        sandboxed=True,
        vmm_pid=os.getpid(),
        vmm_start_time=own_start(),
        vcpus=2,
        memory_mb=256,
        memory_limit_mb=320,
    )
    add_record(reg, "vm-b", alive=False, state="running", vcpus=1, memory_mb=128)
    add_record(reg, "vm-c", state="starting", detached=False)

    result = invoke(state, "vm", "ls", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["vm_id"]: r for r in json.loads(result.stdout)}
    assert [rows[i]["status"] for i in ("vm-a", "vm-b", "vm-c")] == [
        "running",
        "stale",
        "starting",
    ]
    assert rows["vm-a"]["vmm_alive"] and rows["vm-a"]["owner_alive"]
    assert rows["vm-a"]["memory_limit_mb"] == 320 and rows["vm-a"]["sandboxed"] is True
    assert not rows["vm-b"]["owner_alive"]
    assert all(isinstance(r["uptime_s"], float) and r["uptime_s"] >= 0 for r in rows.values())

    result = invoke(state, "vm", "ls")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATE",
        "UPTIME",
        "SANDBOXED",
        "DETACHED",
        "PID",
        "VCPUS",
        "MEMORY",
        "LIMIT",
        "SECCOMP",
    ]
    row_a = next(line for line in lines if line.startswith("vm-a"))
    pid = str(os.getpid())
    # vm-a's "VMM" is this test process: no seccomp filter, read live from /proc.
    assert row_a.split()[-2] == "OFF" and rows["vm-a"]["seccomp_mode"] == 0
    assert rows["vm-c"]["seccomp_mode"] is None
    assert row_a.split()[:-2] == [
        "vm-a",
        "running",
        "0s",
        "yes",
        "yes",
        pid,
        "2",
        "256",
        "MiB",
        "320",
        "MiB",
    ]
    row_b = next(line for line in lines if line.startswith("vm-b"))
    assert "stale" in row_b and row_b.split()[5] == "-"  # no VMM pid recorded
    assert "ironclaw gc" in result.stderr


def test_ls_empty_says_so(state: Path) -> None:
    result = invoke(state, "vm", "ls")
    assert result.exit_code == 0
    assert "no VMs" in result.stderr and str(state) in result.stderr


def test_unsafe_state_dir_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "open"
    bad.mkdir(mode=0o777)
    bad.chmod(0o777)
    result = invoke(bad, "vm", "ls")
    assert result.exit_code == 1
    assert "writable by group or others" in result.stderr


# --------------------------------------------------------------------------- stats


def test_stats_reads_cgroup_files(state: Path, reg: Registry, tmp_path: Path) -> None:
    cgroups = fake_cgroups(
        tmp_path,
        "vm-s",
        {
            "cpu.stat": "usage_usec 1500000\nnr_periods 10\nnr_throttled 2\nthrottled_usec 7\n",
            "memory.current": "5242880\n",
            "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
            "io.stat": "8:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
        },
    )
    add_record(reg, "vm-s", state="running", cgroups=cgroups, memory_limit_mb=192)

    result = invoke(state, "vm", "stats", "vm-s", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["vm_id"] == "vm-s"
    assert data["cpu_usage_ns"] == 1_500_000_000 and data["throttled_ns"] == 7000
    assert data["memory_current_bytes"] == 5 * 2**20
    assert data["memory_limit_bytes"] == 192 * 2**20
    assert data["oom_kills"] == 0
    # Files this fake host lacks are null, never zero.
    assert data["memory_peak_bytes"] is None and data["pids_current"] is None
    assert data["seccomp_mode"] is None  # no VMM pid recorded: nothing to read
    assert data["io"] == {
        "8:0": {"read_bytes": 4096, "write_bytes": 0, "read_ios": 1, "write_ios": 0}
    }

    result = invoke(state, "vm", "stats", "vm-s")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "1.500 s" in out and "5.0 MiB" in out and "io 8:0" in out
    peak = next(line for line in out.splitlines() if "memory peak" in line)
    assert " - " in peak


def test_stats_watch_json_ends_when_the_vm_is_gone(
    state: Path, reg: Registry, tmp_path: Path
) -> None:
    cgroups = fake_cgroups(tmp_path, "vm-w", {"memory.current": "4096\n"})
    add_record(reg, "vm-w", state="running", cgroups=cgroups)
    timer = threading.Timer(0.3, reg.release, args=("vm-w",))
    timer.start()
    try:
        result = invoke(state, "vm", "stats", "vm-w", "--watch", "--json", "--interval", "0.05")
    finally:
        timer.cancel()
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) >= 2 and all(d["memory_current_bytes"] == 4096 for d in lines)
    assert "is gone" in result.stderr


def test_stats_without_cgroups_is_a_usage_error(state: Path, reg: Registry) -> None:
    add_record(reg, "vm-u", state="running", sandboxed=False)
    result = invoke(state, "vm", "stats", "vm-u")
    assert result.exit_code == 2
    assert "vm-u has no cgroups" in result.stderr and "unjailed" in result.stderr


# --------------------------------------------------------------------------- logs


def test_logs_prints_console_and_supervisor_log(state: Path, reg: Registry, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"booting\nIRONCLAW-PROBE-READY\n")
    add_record(reg, "vm-l", console_path=console, log_path=reg.log_path("vm-l"))
    reg.log_path("vm-l").write_text("supervisor says hi\n")

    result = invoke(state, "vm", "logs", "vm-l")
    assert result.exit_code == 0, result.output
    assert result.stdout == "booting\nIRONCLAW-PROBE-READY\n"

    result = invoke(state, "vm", "logs", "--supervisor", "vm-l")
    assert result.exit_code == 0 and result.stdout == "supervisor says hi\n"


def test_logs_follow_until_the_record_is_gone(state: Path, reg: Registry, tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"one\n")
    add_record(reg, "vm-f", console_path=console)

    def later() -> None:
        time.sleep(0.3)
        with console.open("ab") as f:
            f.write(b"two\n")
        time.sleep(0.3)
        reg.release("vm-f")

    thread = threading.Thread(target=later)
    thread.start()
    started = time.monotonic()
    result = invoke(state, "vm", "logs", "-f", "vm-f")
    thread.join()
    assert result.exit_code == 0, result.output
    assert result.stdout == "one\ntwo\n"
    assert time.monotonic() - started < 5


def test_logs_without_console(state: Path, reg: Registry) -> None:
    add_record(reg, "vm-n", detached=False)
    result = invoke(state, "vm", "logs", "vm-n")
    assert result.exit_code == 1 and "no console log yet" in result.stderr
    result = invoke(state, "vm", "logs", "--supervisor", "vm-n")
    assert result.exit_code == 1 and "not detached" in result.stderr


# --------------------------------------------------------------------------- unknown ids


@pytest.mark.parametrize(
    "argv",
    [["vm", "stats"], ["vm", "logs"], ["vm", "stop"], ["vm", "logs", "-f"]],
    ids=lambda a: "-".join(a),
)
def test_unknown_id_is_named_exit_2(state: Path, argv: list[str]) -> None:
    result = invoke(state, *argv, "no-such-vm")
    assert result.exit_code == 2, result.output
    assert "no VM 'no-such-vm'" in result.stderr and "ironclaw vm ls" in result.stderr
    assert "Traceback" not in result.output


def test_invalid_id_exit_2(state: Path) -> None:
    result = invoke(state, "vm", "stats", "bad/id")
    assert result.exit_code == 2 and "is invalid" in result.stderr


# --------------------------------------------------------------------------- stop


def test_stop_needs_ids_or_all(state: Path) -> None:
    assert invoke(state, "vm", "stop").exit_code == 2
    result = invoke(state, "vm", "stop", "a", "--all")
    assert result.exit_code == 2 and "not both" in result.stderr


def test_stop_refuses_a_foreground_vm(state: Path, reg: Registry) -> None:
    add_record(reg, "vm-fg", detached=False)
    result = invoke(state, "vm", "stop", "vm-fg")
    assert result.exit_code == 2
    assert "not detached" in result.stderr and f"pid {os.getpid()}" in result.stderr
    assert reg.get("vm-fg") is not None


def test_stop_of_a_dead_foreground_vm_says_gc(state: Path, reg: Registry) -> None:
    add_record(reg, "vm-dead", detached=False, alive=False)
    result = invoke(state, "vm", "stop", "vm-dead")
    assert result.exit_code == 2
    assert "is gone" in result.stderr and "ironclaw gc" in result.stderr
    assert reg.get("vm-dead") is not None  # left for gc


def test_stop_calls_stop_detached(
    state: Path, reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_record(reg, "vm-1")
    add_record(reg, "vm-2")
    add_record(reg, "vm-fg", detached=False)
    stopped: list[tuple[str, float]] = []

    async def fake_stop(registry: Registry, vm_id: str, timeout_s: float) -> None:
        assert registry.state_dir == state
        stopped.append((vm_id, timeout_s))
        registry.release(vm_id)

    monkeypatch.setattr(vm_stop_cli, "stop_detached", fake_stop)
    result = invoke(state, "vm", "stop", "--all", "--timeout", "3")
    assert result.exit_code == 0, result.output
    assert sorted(stopped) == [("vm-1", 3.0), ("vm-2", 3.0)]
    assert "stopped VM vm-1" in result.stdout and "stopped VM vm-2" in result.stdout
    assert "skipped" in result.stderr and "vm-fg" in result.stderr

    result = invoke(state, "vm", "stop", "--all")
    assert result.exit_code == 0 and "no detached VMs" in result.stderr


def test_stop_reports_library_errors(
    state: Path, reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ironclaw_orchestrator.errors import CleanupError

    add_record(reg, "vm-1")

    async def fake_stop(registry: Registry, vm_id: str, timeout_s: float) -> None:
        raise CleanupError(f"VM {vm_id}: cleanup left resources behind", ["netns x: busy"])

    monkeypatch.setattr(vm_stop_cli, "stop_detached", fake_stop)
    result = invoke(state, "vm", "stop", "vm-1")
    assert result.exit_code == 6
    assert "cleanup left resources behind" in result.stderr and "netns x: busy" in result.stderr


# --------------------------------------------------------------------------- start


def test_start_defaults_to_the_halting_probe(state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[VmConfig] = []

    async def fake_spawn(config: VmConfig, registry: Registry, *, timeout_s: float) -> VmRecord:
        assert registry.state_dir == state and timeout_s == 60.0
        seen.append(config)
        return add_record(registry, config.vm_id, state="running", sandboxed=True, vmm_pid=42)

    monkeypatch.setattr(detached_cli, "spawn_supervisor", fake_spawn)
    result = invoke(state, "vm", "start", "-d", "--id", "web-1", "--vcpus", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == "web-1\n"
    [config] = seen
    assert config.vm_id == "web-1" and config.vcpu_count == 2 and config.memory_mb == 128
    assert config.kernel_path == str(probe_kernel_path(ProbeBehaviour.HALT))
    assert "web-1 running" in result.stderr

    result = invoke(state, "vm", "start", "--json", "--probe", "spin", "--id", "web-2")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["vm_id"] == "web-2" and record["detached"] and record["vmm_pid"] == 42
    assert seen[1].kernel_path == str(probe_kernel_path(ProbeBehaviour.SPIN))


def test_start_generated_id_is_kept_across_probe_rebuild(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def fake_spawn(config: VmConfig, registry: Registry, *, timeout_s: float) -> VmRecord:
        return add_record(registry, config.vm_id, state="running")

    monkeypatch.setattr(detached_cli, "spawn_supervisor", fake_spawn)
    result = invoke(state, "vm", "start")
    assert result.exit_code == 0, result.output
    vm_id = result.stdout.strip()
    assert vm_id.startswith("ironclaw-run-")
    assert Registry(state).get(vm_id) is not None


def test_start_errors(state: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    async def fake_spawn(config: VmConfig, registry: Registry, *, timeout_s: float) -> VmRecord:
        raise RegistryError(f"VM id {config.vm_id} is in use (pid 1); pick another id")

    monkeypatch.setattr(detached_cli, "spawn_supervisor", fake_spawn)
    result = invoke(state, "vm", "start", "--id", "busy")
    assert result.exit_code == 1 and "VM id busy is in use" in result.stderr

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    result = invoke(state, "vm", "start", "--kernel", str(kernel), "--probe", "halt")
    assert result.exit_code == 2 and "--probe" in result.stderr
    result = invoke(state, "vm", "start", "--id", "bad id")
    assert result.exit_code == 2 and "vm_id" in result.stderr


# --------------------------------------------------------------------------- gc


class _NoHostGc(gc_lib.GcHost):
    """gc's host access confined to tmp directories (no host cgroups)."""

    def cgroup_parent_dirs(self, records: Sequence[VmRecord]) -> list[Path]:
        return []


@pytest.fixture
def hermetic_gc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []
    real = gc_lib.collect_garbage

    def fake(registry: Registry, **kwargs: Any) -> gc_lib.GcReport:
        calls.append(kwargs)
        (tmp_path / "netns").mkdir(exist_ok=True)
        return real(
            registry,
            run_root=tmp_path / "run",
            host=_NoHostGc(netns_dir=tmp_path / "netns"),
            **kwargs,
        )

    monkeypatch.setattr(gc_cli, "collect_garbage", fake)
    yield calls


def test_gc_dry_run_json(
    state: Path, reg: Registry, tmp_path: Path, hermetic_gc: list[dict[str, Any]]
) -> None:
    run_dir = tmp_path / "run" / "vms" / "vm-x"
    run_dir.mkdir(parents=True)
    add_record(reg, "vm-x", alive=False, state="running", run_dir=run_dir)
    add_record(reg, "vm-live")
    base = tmp_path / "jail"
    base.mkdir()

    result = invoke(state, "gc", "--dry-run", "--json", "--chroot-base", str(base))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"dry_run", "ok", "live", "actions"}
    assert report["dry_run"] is True and report["ok"] is True
    assert report["live"] == ["vm-live"]
    actions = {(a["kind"], a["vm_id"]): a for a in report["actions"]}
    assert set(actions) == {("run_dir", "vm-x"), ("record", "vm-x")}
    for a in report["actions"]:
        assert set(a) == {"kind", "name", "vm_id", "action", "reason", "error"}
        assert a["action"].startswith("would") and a["error"] is None
    assert actions[("run_dir", "vm-x")]["name"] == str(run_dir)
    assert hermetic_gc[0]["dry_run"] is True and hermetic_gc[0]["chroot_bases"] == (base,)
    assert run_dir.is_dir() and reg.get("vm-x") is not None  # nothing touched

    result = invoke(state, "gc", "--chroot-base", str(base))
    assert result.exit_code == 0, result.output
    assert "removed" in result.stdout and "vm-live" in result.stdout
    assert not run_dir.exists() and reg.get("vm-x") is None and reg.get("vm-live") is not None

    result = invoke(state, "gc", "--chroot-base", str(base))
    assert result.exit_code == 0 and "nothing to clean up" in result.stdout


def test_gc_defaults_and_failure_exit(
    state: Path, reg: Registry, tmp_path: Path, hermetic_gc: list[dict[str, Any]]
) -> None:
    # A recorded run dir that is not <run root>/vms/<id>: gc refuses it and fails.
    add_record(reg, "vm-bad", alive=False, run_dir=tmp_path / "elsewhere" / "vm-bad")
    result = invoke(state, "gc", "--id", "vm-bad")
    assert result.exit_code == 1, result.output
    assert "not removed" in result.stdout and "failed" in result.stderr
    assert hermetic_gc[0]["chroot_bases"] == (Path("/var/jail"),)
    assert hermetic_gc[0]["vm_ids"] == ["vm-bad"]
    assert reg.get("vm-bad") is not None

    result = invoke(state, "gc", "--json", "--id", "vm-bad")
    assert result.exit_code == 1 and json.loads(result.stdout)["ok"] is False

    assert invoke(state, "gc", "--id", "bad/id").exit_code == 2
