"""``python -m ironclaw_orchestrator.cli``."""

from . import main

main()
