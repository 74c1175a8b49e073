"""At-fork guard installed on import of :mod:`ironclaw_orchestrator.vm.netns`.

pyroute2 forks helper processes to reach other namespaces (``IPRoute(netns=...)``, the
fallback namespace creation); this keeps those children from signalling our event loop.
"""

from __future__ import annotations

import os
import signal
from contextlib import suppress


def _forget_wakeup_fd() -> None:
    """In a forked child: stop writing signals into the parent's asyncio wakeup fd.

    pyroute2 forks helper processes to reach other namespaces and ends them with SIGTERM. A
    child still running Python would write that 15 into the wakeup fd it inherited, and the
    parent's event loop would run its SIGTERM handler although nobody signalled it.
    """
    with suppress(ValueError):  # not the main thread: nothing inherited to undo
        signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_wakeup_fd)
