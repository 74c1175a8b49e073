"""Cancellation that never leaves host resources behind.

asyncio users wrap everything in ``asyncio.timeout``, ``wait_for`` and task groups, so a
start or a stop may be cancelled at any ``await``. Three rules keep that safe:

* work handed to a thread is waited for before anything is rolled back: a cancelled
  ``to_thread`` keeps running, and would create what the rollback already removed
  (:class:`ThreadSteps`);
* a rollback or clean-up, once begun, runs to its end even if a second cancellation
  arrives meanwhile; the cancellation is re-raised afterwards (:func:`finish`);
* a stop runs in a task of its own (:class:`Resumable`): a cancelled caller leaves it
  running; a later call waits for it, or runs it again if it was itself cancelled or
  failed (its steps are idempotent, so it resumes where it stopped).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

__all__ = ["Resumable", "ThreadSteps", "finish"]

log = logging.getLogger(__name__)
T = TypeVar("T")


async def finish(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end, however often the caller is cancelled meanwhile.

    If it was cancelled, ``CancelledError`` is raised once ``aw`` is done (its own error, if
    any, is logged: the cancellation is what the caller asked for); otherwise ``aw``'s
    result or error comes back as usual.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})  # neither raises the task's error nor cancels it
        except asyncio.CancelledError:
            cancelled = True  # keep waiting: leaving now would leave its work half-done
    if cancelled:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("clean-up after a cancellation failed: %s", error)
        raise asyncio.CancelledError
    return task.result()


class ThreadSteps:
    """Blocking steps run in a thread, one at a time, whose end a rollback waits for.

    A cancel interrupts the caller's wait at once; :meth:`settle` then waits until the
    step's thread is done, so that the rollback sees (and removes) what it made.
    """

    def __init__(self) -> None:
        self._running: asyncio.Future[Any] | None = None

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        # The executor's own future, not to_thread's task around it: one object less per
        # hop (no step reads a context variable, so none needs copying into the thread).
        fut: asyncio.Future[T] = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._running = fut
        return await asyncio.shield(fut)

    async def settle(self) -> None:
        """Wait for the last step to end (its error is the caller's to report)."""
        fut = self._running
        if fut is not None:
            await finish(asyncio.wait([fut]))
            if not fut.cancelled():
                fut.exception()  # retrieved: the failure is reported by the caller


class Resumable(Generic[T]):
    """An operation (a stop) run in its own task, once, and resumed if it was cut short.

    ``await run(factory)`` starts ``factory()`` in a task and waits for it. A cancelled
    caller leaves the task running; a later call waits for the same task. If the task was
    cancelled (the event loop shutting down) or failed, the next call starts it again.
    """

    def __init__(self) -> None:
        self._task: asyncio.Future[T] | None = None

    @property
    def done(self) -> bool:
        """It ran to its end without an error."""
        task = self._task
        return task is not None and task.done() and not task.cancelled() and not task.exception()

    async def run(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        task = self._task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._task = asyncio.ensure_future(factory())
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background task's error as seen (its next caller gets it, or a retry)."""
    if not task.cancelled():
        task.exception()
