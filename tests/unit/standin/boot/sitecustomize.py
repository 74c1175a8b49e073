"""Puts an ``ironclaw`` or supervisor process started by a refusal test on its stand-in host.

A test's refusal host (``standin_host.make_refusal_host``) sets ``IRONCLAW_STANDIN_HOST``
and puts this directory on ``PYTHONPATH``; Python imports this module at start-up. Only
the orchestrator's own processes join the host (``python -m ironclaw_orchestrator.cli``,
the ``ironclaw`` script, the supervisor); any other Python process is left alone.
"""

import os
import sys
from pathlib import Path

_spec = os.environ.get("IRONCLAW_STANDIN_HOST")
_argv = getattr(sys, "orig_argv", [])
_ours = ("ironclaw_orchestrator.cli", "ironclaw_orchestrator.supervisor")
_script = Path(_argv[1]).name if len(_argv) > 1 else ""
if _spec and (_script == "ironclaw" or any(a in _ours for a in _argv)):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/unit
    import standin_host

    standin_host.join_from_child(_spec)
