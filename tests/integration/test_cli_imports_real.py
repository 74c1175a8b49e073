"""A real, jailed ``ironclaw vm run`` of the probe guest loads only what it needs.

Guards the CLI's start-up by work, not time: the whole process (argument parsing, the jailed
start, the guest's run, stop and cleanup) must never import pyroute2 (the namespace is made
and removed with plain syscalls when the VM has no TAP or uplink), psutil, httpx, rich (it
printed nothing through it) or the other commands' modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ironclaw_orchestrator.vm.probe import READY_LINE

pytestmark = pytest.mark.integration

NEVER = (
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
OTHER_COMMANDS = (
    "ironclaw_orchestrator.gc",
    "ironclaw_orchestrator.install",
    "ironclaw_orchestrator.doctor",
    "ironclaw_orchestrator.supervisor",
    "ironclaw_orchestrator.detach",
    "ironclaw_orchestrator.cli.detached",
    "ironclaw_orchestrator.cli.vm_list",
    "ironclaw_orchestrator.cli.vm_stop",
    "ironclaw_orchestrator.cli.doctor",
    "ironclaw_orchestrator.cli.gc",
    "ironclaw_orchestrator.cli.install",
    "ironclaw_orchestrator.cli.guest",
    "ironclaw_orchestrator.cli.image",
    "ironclaw_orchestrator.agent.client",
    "ironclaw_orchestrator.agent.messages",
)

# Runs the console script's main() and writes sys.modules as the process exits.
RUNNER = textwrap.dedent(
    """
    import atexit, json, sys
    out = sys.argv.pop(1)
    atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
    sys.argv[0] = "ironclaw"
    from ironclaw_orchestrator.cli import main
    main()
    """
)


def test_jailed_vm_run_loads_no_heavy_module(vm_id: str, chroot_base: Path, tmp_path: Path) -> None:
    dump = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(dump), "vm", "run", "--id", vm_id, "--require-sandbox"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert READY_LINE in result.stdout
    modules = set(json.loads(dump.read_text()))
    assert "ironclaw_orchestrator.vm.jailer" in modules  # it did start a jailed VM
    assert sorted(m for m in modules if m.split(".")[0] in NEVER) == []
    loaded = [m for m in modules if any(m == p or m.startswith(p + ".") for p in OTHER_COMMANDS)]
    assert sorted(loaded) == []
