"""The CLI imports only what the command it runs needs.

Start-up time is guarded by work, not time: each test runs Python in a subprocess (a fresh
``sys.modules``) and asserts which modules a step imported. A module that appears here is
one that every ``ironclaw`` command, or every ``vm run``, would pay for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ironclaw_orchestrator import registry
from ironclaw_orchestrator.cli import COMMANDS, STATE_DIR_HELP, VM_COMMANDS, app
from ironclaw_orchestrator.cli.summaries import SUMMARIES

#: Third-party packages no command needs before it does its work (rich: only to print).
HEAVY = (
    "pyroute2",
    "psutil",
    "httpx",
    "httpcore",
    "rich",
    "click",
    "fastapi",
    "starlette",
    "uvicorn",
    "ray",
)
#: Library modules only some commands need.
LIBRARY_ONLY_SOME = (
    "ironclaw_orchestrator.gc",
    "ironclaw_orchestrator.install",
    "ironclaw_orchestrator.doctor",
    "ironclaw_orchestrator.supervisor",
    "ironclaw_orchestrator.detach",
    # The guest agent's client and message models: only vm exec/cp and the agent API.
    "ironclaw_orchestrator.agent.client",
    "ironclaw_orchestrator.agent.messages",
    # Snapshots, restores and warm pools: only the snapshot commands (loaded on first use).
    "ironclaw_orchestrator.vm.snapshot",
    "ironclaw_orchestrator.vm.snapshot_dir",
    "ironclaw_orchestrator.vm.restore",
    "ironclaw_orchestrator.vm.pool",
)
CLI_MODULES = {spec.split(":")[0] for spec in (*COMMANDS.values(), *VM_COMMANDS.values())} - {""}


def modules_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    """The names in ``sys.modules`` when a fresh interpreter that ran ``code`` exits.

    Printed by an ``atexit`` handler: ``cli.main`` ends the process with ``os._exit`` after
    running those (``cli.startup.exit_now``), so nothing after ``main()`` would run.
    """
    script = textwrap.dedent(
        """
        import atexit as _atexit

        def _print_modules():
            import json as _json, sys as _sys
            print("MODULES=" + _json.dumps(sorted(_sys.modules)), flush=True)

        _atexit.register(_print_modules)
        """
    ) + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MODULES="))
    return set(json.loads(line.removeprefix("MODULES=")))


def top_level(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in names)


def under(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_import_cli_imports_no_command_and_nothing_heavy() -> None:
    """The console script's import of the package loads no typer: ``main()`` loads it after
    pausing the garbage collector."""
    mods = modules_after("import ironclaw_orchestrator.cli")
    ours = sorted(m for m in mods if m.startswith("ironclaw_orchestrator"))
    assert ours == [
        "ironclaw_orchestrator",
        "ironclaw_orchestrator.cli",
        "ironclaw_orchestrator.cli.startup",
    ]
    assert top_level(mods, (*HEAVY, "typer", "pydantic", "h11", "httptools", "asyncio")) == []


def test_the_command_tree_loads_no_command_and_nothing_heavy() -> None:
    mods = modules_after("from ironclaw_orchestrator.cli import app, COMMANDS")
    ours = sorted(m for m in mods if m.startswith("ironclaw_orchestrator"))
    assert ours == [
        "ironclaw_orchestrator",
        "ironclaw_orchestrator.cli",
        "ironclaw_orchestrator.cli.common",
        "ironclaw_orchestrator.cli.lazy",
        "ironclaw_orchestrator.cli.root",
        "ironclaw_orchestrator.cli.startup",
        "ironclaw_orchestrator.cli.summaries",
        "ironclaw_orchestrator.errors",
    ]
    assert top_level(mods, (*HEAVY, "pydantic", "h11", "httptools", "asyncio")) == []


def test_the_package_serves_the_tree_and_its_submodules() -> None:
    import ironclaw_orchestrator.cli as cli
    from ironclaw_orchestrator.cli import common, root

    assert cli.app is root.app
    assert cli.vm_app is root.vm_app
    assert cli.ExitCode is common.ExitCode
    assert cli.version_text is root.version_text
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = cli.nonsense


def test_vm_run_imports_its_module_only() -> None:
    """Resolving ``vm run`` imports cli/vm.py and the VM code, not the other commands."""
    mods = modules_after(
        """
        import typer.main
        from ironclaw_orchestrator.cli import app
        group = typer.main.get_command(app)
        run = group.commands["vm"].commands["run"]
        assert run.name == "run"
        """
    )
    prefix = "ironclaw_orchestrator.cli."
    loaded = {m.removeprefix(prefix) for m in mods if m.startswith(prefix)}
    assert "vm" in loaded
    assert sorted(CLI_MODULES & loaded) == ["vm"]
    assert under(mods, LIBRARY_ONLY_SOME) == []
    assert top_level(mods, HEAVY) == []


def test_vm_run_quiet_success_imports_no_rich(tmp_path: Path) -> None:
    """A ``vm run`` whose guest exits cleanly prints nothing through rich, so never imports it,
    and from ``main()`` to its exit loads nothing heavy and no other command (the VM itself is
    faked: what is checked is the CLI around it)."""
    mods = modules_after(
        """
        import sys
        from ironclaw_orchestrator.cli import common, main, vm

        async def fake_run_vm(config, *, force_unjailed, stats):
            assert config.vm_id == "imports-1", config
            return common.ExitCode.OK

        vm.run_vm = fake_run_vm
        sys.argv = ["ironclaw", "vm", "run", "--id", "imports-1"]
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        """,
        env={"IRONCLAW_CACHE_DIR": str(tmp_path / "probe-cache")},
    )
    assert "ironclaw_orchestrator.cli.vm" in mods
    assert top_level(mods, ("rich",)) == []
    assert top_level(mods, HEAVY) == []
    assert under(mods, LIBRARY_ONLY_SOME) == []
    prefix = "ironclaw_orchestrator.cli."
    loaded = {m.removeprefix(prefix) for m in mods if m.startswith(prefix)}
    assert sorted(CLI_MODULES & loaded) == ["vm"]


def test_an_error_is_still_printed_through_rich() -> None:
    """The lazy console prints what the eager one did (rich imported on that first print)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ironclaw_orchestrator.cli",
            "vm",
            "run",
            "--no-jailer",
            "--require-sandbox",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --no-jailer and --require-sandbox contradict"), (
        proc.stderr
    )


@pytest.mark.parametrize(
    ("group", "table"), [((), COMMANDS), (("vm",), VM_COMMANDS)], ids=["root", "vm"]
)
def test_every_table_entry_is_a_command_with_help(
    group: tuple[str, ...], table: dict[str, str]
) -> None:
    import typer.main

    cmd = typer.main.get_command(app)
    for name in group:
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    assert list(cmd.commands)[: len(table)] == list(table)  # type: ignore[attr-defined]
    for name in table:
        sub = cmd.commands[name]  # type: ignore[attr-defined]
        assert sub.name == name
        assert sub.help, f"{name}: no help text"
        # The group's --help lists the summary: the command's help must begin with it.
        key = " ".join((*group, name))
        assert sub.help.split("\n\n")[0] == SUMMARIES[key], key


@pytest.mark.parametrize("argv", [["--help"], ["vm", "--help"]], ids=" ".join)
def test_a_groups_help_imports_none_of_its_commands(argv: list[str]) -> None:
    """``ironclaw --help`` and ``ironclaw vm --help`` list every command by its summary
    without importing the commands' modules (they pull in the library)."""
    mods = modules_after(
        f"""
        import sys
        from ironclaw_orchestrator.cli import main

        sys.argv = ["ironclaw", *{argv!r}]
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        """
    )
    prefix = "ironclaw_orchestrator.cli."
    loaded = {m.removeprefix(prefix) for m in mods if m.startswith(prefix)}
    assert sorted(CLI_MODULES & loaded) == []
    # (typer itself may import pydantic to convert the root's options: typer >= 0.2x does)
    assert under(mods, (*LIBRARY_ONLY_SOME, "ironclaw_orchestrator.vm")) == []
    assert under(mods, ("ironclaw_orchestrator.registry", "asyncio")) == []


def test_a_listed_command_is_loaded_for_real_afterwards(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The stand-ins exist only while the help is printed: a lookup after it gets the
    command itself, with its options."""
    import click
    import typer.main

    group = typer.main.get_command(app).commands["vm"]  # type: ignore[attr-defined]
    with click.Context(group, info_name="vm", terminal_width=400) as ctx:
        listing = group.get_help(ctx) + capsys.readouterr().out  # rich prints it itself
        for name in VM_COMMANDS:
            assert f" {name} " in listing
        assert SUMMARIES["vm resume"] in listing
        run = group.get_command(ctx, "run")
    assert any("--probe" in p.opts for p in run.params), run


def test_unknown_command_is_a_usage_error_with_suggestion() -> None:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["vm", "stpo"])
    assert result.exit_code == 2
    assert "stop" in result.output


def test_state_dir_help_names_the_registry_constants() -> None:
    assert f"${registry.STATE_DIR_ENV}" in STATE_DIR_HELP
    assert str(registry.DEFAULT_STATE_DIR) in STATE_DIR_HELP
