"""``python -m ironclaw_orchestrator.agent --listen unix:PATH``: run the guest agent."""

import sys

from .server import main

sys.exit(main())
