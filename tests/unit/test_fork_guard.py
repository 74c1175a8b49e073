"""Forked children (pyroute2's helpers) must not inherit our asyncio signal wakeup fd."""

import os
import signal
import socket

import ironclaw_orchestrator.vm.netns  # noqa: F401  (installs the at-fork hook)


def test_child_does_not_keep_parent_wakeup_fd() -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    previous = signal.set_wakeup_fd(a.fileno())
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report which wakeup fd it has, then leave at once
            inherited = signal.set_wakeup_fd(-1)
            os.write(w, str(inherited).encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        assert os.read(r, 32) == b"-1"
        os.close(r)
    finally:
        signal.set_wakeup_fd(previous)
        a.close()
        b.close()
