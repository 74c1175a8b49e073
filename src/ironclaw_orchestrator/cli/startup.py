"""The ``ironclaw`` process's own start and end: garbage collection and the exit.

Two costs of a short command belong to the interpreter, and both are spent on objects the
command never frees. During the imports the cyclic garbage collector runs every few hundred
allocations and walks a heap that only grows (nothing an import makes is garbage); at exit the
interpreter tears every module down one object at a time. Of ``ironclaw vm run``'s ~300 ms
(CPU, this 2-core host) they were ~25 ms and ~20 ms.

- :func:`pause_gc` (called by ``cli.main``) stops the collector during the imports and the
  parsing of the command line; :func:`resume_gc` (run before every command's function, see
  :mod:`.lazy`) moves what was made so far to the permanent generation (``gc.freeze``) and
  turns the collector back on, so a command that runs for hours collects as usual and never
  walks the modules again.
- :func:`defer_interrupt` (called by ``cli.main``) holds a Ctrl-C that arrives while the
  command's modules load, and :func:`end_start_up` raises it as ``KeyboardInterrupt`` once they
  have (before the command does anything). CPython cannot always stop an import cleanly: a
  ``KeyboardInterrupt`` raised inside some extension modules' initialisation (``_ssl``'s, under
  ``asyncio``) comes out as an unrelated ``TypeError`` with a traceback, exit 1.
- :func:`exit_now` ends the process with ``os._exit`` once it has done what a normal exit does
  that anyone can observe: the ``atexit`` handlers (logging's flush among them) and flushing
  stdout and stderr. Where that is not enough it exits normally: another non-daemon thread is
  alive (the interpreter would wait for it), the code is not an int in 0-255 (the interpreter
  prints or truncates it), or a flush fails (the interpreter reports it, exit status 120).
"""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

__all__ = ["defer_interrupt", "end_start_up", "exit_now", "pause_gc", "resume_gc"]

_paused = False
_interrupt_pending = False


def pause_gc() -> None:
    """Stop the cyclic collector until :func:`resume_gc` (no-op if it is already off)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def resume_gc() -> None:
    """Freeze what start-up made and turn the collector back on, if :func:`pause_gc` stopped
    it; otherwise do nothing (a caller that turned it off itself keeps it off)."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()


def _note_interrupt(signum: int, frame: FrameType | None) -> None:
    global _interrupt_pending
    _interrupt_pending = True


def defer_interrupt() -> None:
    """Hold SIGINT until :func:`end_start_up` (only if it has Python's usual handler)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _note_interrupt)


def end_start_up() -> None:
    """The command is about to run: :func:`resume_gc`, give SIGINT its usual handler back and
    raise ``KeyboardInterrupt`` now if one arrived while it was held."""
    global _interrupt_pending
    resume_gc()
    if signal.getsignal(signal.SIGINT) is _note_interrupt:  # so we are in the main thread
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if _interrupt_pending:
        _interrupt_pending = False
        raise KeyboardInterrupt


def _other_threads_alive() -> bool:
    main = threading.main_thread()
    return any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate())


def exit_now(code: object) -> NoReturn:
    """Exit with ``code`` (a ``SystemExit`` code) without the interpreter's teardown."""
    if code is None:
        code = 0
    if not isinstance(code, int) or not 0 <= code <= 255 or _other_threads_alive():
        raise SystemExit(code)
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        raise SystemExit(code) from None
    os._exit(code)
