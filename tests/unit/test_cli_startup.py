"""The ``ironclaw`` process's start and end (cli/startup.py): no garbage collection while the
command loads, and an exit without the interpreter's teardown that still does what a normal
exit does that anyone can see. Each test runs a fresh interpreter; none measures time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

PRELUDE = """
import atexit, gc, os, sys, threading, time
from ironclaw_orchestrator.cli.startup import exit_now


class Noisy:
    def __del__(self):
        os.write(2, b"TEARDOWN\\n")  # not through sys.stderr: a test closes sys.stdout


noisy = Noisy()  # freed by the interpreter's teardown, and only by it
"""


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PRELUDE) + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_exit_now_runs_atexit_flushes_and_keeps_the_code() -> None:
    proc = run_python(
        """
        atexit.register(lambda: print("ATEXIT"))
        sys.stdout.write("buffered, no newline ")
        sys.stderr.write("to stderr")
        exit_now(3)
        print("NOT REACHED")
        """
    )
    assert proc.returncode == 3
    assert proc.stdout == "buffered, no newline ATEXIT\n"
    assert proc.stderr == "to stderr"


def test_exit_now_skips_the_teardown() -> None:
    proc = run_python("exit_now(0)")
    assert proc.returncode == 0
    assert "TEARDOWN" not in proc.stderr


def test_a_plain_exit_does_the_teardown() -> None:
    """The control for the test above: the probe object is freed by a normal exit."""
    proc = run_python("sys.exit(0)")
    assert proc.returncode == 0
    assert "TEARDOWN" in proc.stderr


def test_exit_now_waits_for_a_live_thread_like_a_normal_exit() -> None:
    proc = run_python(
        """
        def work():
            time.sleep(0.2)
            print("THREAD DONE", flush=True)

        threading.Thread(target=work).start()
        exit_now(4)
        """
    )
    assert proc.returncode == 4
    assert "THREAD DONE" in proc.stdout
    assert "TEARDOWN" in proc.stderr  # the normal exit path


def test_exit_now_ignores_daemon_threads() -> None:
    proc = run_python(
        """
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        exit_now(0)
        """
    )
    assert proc.returncode == 0
    assert "TEARDOWN" not in proc.stderr


def test_exit_now_leaves_other_codes_to_the_interpreter() -> None:
    message = run_python('exit_now("bye")')
    assert message.returncode == 1
    assert message.stderr.startswith("bye\n")
    none = run_python("exit_now(None)")
    assert none.returncode == 0
    assert "TEARDOWN" not in none.stderr
    big = run_python("exit_now(300)")
    assert "TEARDOWN" in big.stderr  # out of 0-255: what the interpreter does with it


def test_exit_now_falls_back_when_stdout_cannot_be_flushed() -> None:
    proc = run_python(
        """
        sys.stdout.close()
        exit_now(5)
        """
    )
    assert proc.returncode == 5
    assert "TEARDOWN" in proc.stderr  # the normal exit path


def test_vm_run_collects_no_garbage_while_it_loads(tmp_path: Path) -> None:
    """From ``main()`` to the command's work the collector never runs (the imports and the
    parsing allocate only what lives on); the command then runs with it on, the start-up's
    objects frozen. The VM itself is faked: ``asyncio.run`` records the state instead."""
    proc = run_python(
        """
        import asyncio
        from ironclaw_orchestrator.cli import main

        runs = []
        gc.callbacks.append(lambda phase, info: phase == "start" and runs.append(info))

        def fake_run(coro):
            coro.close()
            print(f"COLLECTIONS={len(runs)} ENABLED={gc.isenabled()}", flush=True)
            print(f"FROZEN={gc.get_freeze_count() > 0}", flush=True)
            return 0

        asyncio.run = fake_run
        sys.argv = ["ironclaw", "vm", "run", "--id", "startup-1"]
        runs.clear()
        main()
        """,
        env={"IRONCLAW_CACHE_DIR": str(tmp_path / "probe-cache")},
    )
    assert proc.returncode == 0, proc.stderr
    assert "COLLECTIONS=0 ENABLED=True\nFROZEN=True\n" in proc.stdout, proc.stdout
    assert "TEARDOWN" not in proc.stderr  # ended by exit_now


def test_resume_gc_leaves_a_collector_it_did_not_stop_alone() -> None:
    proc = run_python(
        """
        from ironclaw_orchestrator.cli.startup import pause_gc, resume_gc

        gc.disable()
        pause_gc()  # already off: not ours to turn back on
        resume_gc()
        print("ENABLED", gc.isenabled(), "FROZEN", gc.get_freeze_count())
        """
    )
    assert proc.stdout.startswith("ENABLED False FROZEN 0"), proc.stdout + proc.stderr


def test_ctrl_c_while_the_command_loads_is_raised_before_it_starts(tmp_path: Path) -> None:
    """SIGINT during ``vm run``'s imports does not interrupt an import (CPython can turn that
    into an unrelated error): it is held, then ends the command as Ctrl-C does (130) before
    the command does anything."""
    proc = run_python(
        """
        import asyncio, importlib.abc, signal

        class Interrupt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ironclaw_orchestrator.cli.vm":
                    os.kill(os.getpid(), signal.SIGINT)  # delivered at once, mid-import
                    os.write(1, b"SENT\\n")
                return None

        def fake_run(coro):
            coro.close()
            print("RAN", flush=True)
            return 0

        asyncio.run = fake_run
        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["ironclaw", "vm", "run", "--id", "startup-2"]
        from ironclaw_orchestrator.cli import main
        main()
        """,
        env={"IRONCLAW_CACHE_DIR": str(tmp_path / "probe-cache")},
    )
    assert proc.stdout == "SENT\n", proc.stdout + proc.stderr
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_ctrl_c_held_with_no_command_to_run_still_counts() -> None:
    """``--help`` (no command function runs): a Ctrl-C held while it loaded still ends the
    process as SIGINT does, once the help is out."""
    proc = run_python(
        """
        import importlib.abc, signal

        class Interrupt(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "ironclaw_orchestrator.cli.root":
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, Interrupt())
        sys.argv = ["ironclaw", "--help"]
        from ironclaw_orchestrator.cli import main
        main()
        """
    )
    assert "Usage" in proc.stdout, proc.stderr
    assert proc.returncode == -2, (proc.returncode, proc.stderr)


def test_end_start_up_restores_the_usual_handler() -> None:
    proc = run_python(
        """
        import signal
        from ironclaw_orchestrator.cli.startup import defer_interrupt, end_start_up

        defer_interrupt()
        os.kill(os.getpid(), signal.SIGINT)
        print("HELD", flush=True)
        try:
            end_start_up()
        except KeyboardInterrupt:
            print("RAISED", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        end_start_up()  # nothing pending: no second interrupt
        print("DONE", flush=True)
        """
    )
    assert proc.stdout == "HELD\nRAISED True\nDONE\n", proc.stdout + proc.stderr


class _Resumed(Exception):
    pass


def _leaves(command: Any, path: str = "ironclaw") -> Iterator[tuple[str, Any]]:
    commands = getattr(command, "commands", None)
    if commands is None:
        yield path, command
        return
    for name in list(commands):
        yield from _leaves(commands[name], f"{path} {name}")


def test_every_command_ends_the_start_up_before_its_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each command of the tree (sub-groups' too) calls end_start_up before its own function:
    a long-running one (serve, vm run --probe spin) must not run without the collector, nor
    with Ctrl-C held."""
    import typer.main

    from ironclaw_orchestrator.cli import app, lazy

    def resumed() -> None:
        raise _Resumed

    monkeypatch.setattr(lazy, "end_start_up", resumed)
    leaves = list(_leaves(typer.main.get_command(app)))
    assert {"ironclaw vm run", "ironclaw serve", "ironclaw image add-agent"} <= {
        path for path, _ in leaves
    }
    for path, command in leaves:
        with pytest.raises(_Resumed):  # raised before the command's own function runs
            command.callback()
            pytest.fail(f"{path}: ran without resuming the collector")
