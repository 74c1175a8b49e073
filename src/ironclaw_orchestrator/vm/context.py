"""``async with start_firecracker(cfg) as vm:``: a start that is both awaitable and a context.

:class:`Starting` wraps the start coroutine the way ``httpx.AsyncClient`` is used: ``await``
it to get the handle and stop it yourself, or ``async with`` it to have the handle stopped,
and everything made for it removed, when the block ends: normally, by an exception or by
cancellation. :func:`stop_on_exit` is the shared exit logic, also used by the handles'
own ``__aexit__`` (``async with await start_firecracker(cfg) as vm:``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

__all__ = ["Starting", "Stoppable", "awaitable_context", "stop_on_exit"]

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    @property
    def vm_id(self) -> str: ...

    def stop(self) -> Awaitable[object]: ...


T = TypeVar("T", bound=Stoppable)
P = ParamSpec("P")


async def stop_on_exit(handle: Stoppable, exc: BaseException | None) -> None:
    """Stop ``handle`` when an ``async with`` block ends; finish even if cancelled meanwhile.

    The stop runs in its own task: a cancellation of the caller (a second Ctrl-C, a timeout)
    while it runs is held back until the VM is stopped and cleaned up, then re-raised. If the
    block raised and the stop fails too, the block's exception propagates, with a note
    naming the clean-up failure; otherwise the stop's error does.
    """
    task = asyncio.ensure_future(handle.stop())
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})  # neither raises its error nor cancels it
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True  # keep waiting: leaving now would leak the VM
    error = None if task.cancelled() else task.exception()
    if exc is not None:  # the block's exception (a CancelledError too) propagates
        if error is not None:
            log.error("VM %s: clean-up failed: %s", handle.vm_id, error)
            exc.add_note(f"while handling it, stopping VM {handle.vm_id} also failed: {error}")
        return
    if cancelled or task.cancelled():
        if error is not None:
            log.error("VM %s: clean-up failed: %s", handle.vm_id, error)
        raise asyncio.CancelledError
    if error is not None:
        raise error


class Starting(Generic[T]):
    """A VM being started: ``await`` it for the handle, or ``async with`` it (stopped on exit).

    Awaited once only, like the coroutine it wraps.
    """

    __slots__ = ("_coro", "_handle")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self._coro = coro
        self._handle: T | None = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    async def __aenter__(self) -> T:
        self._handle = await self._coro
        return self._handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            await stop_on_exit(handle, exc)

    def close(self) -> None:
        """Drop a start that will never be awaited (no 'never awaited' warning)."""
        self._coro.close()

    # The coroutine protocol, so that a start is also a coroutine to asyncio:
    # ``asyncio.create_task(start_firecracker(cfg))``, ``TaskGroup.create_task(...)``.
    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        return self._coro.throw(*args)


def awaitable_context(func: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Starting[T]]:
    """Make an ``async def`` start function return a :class:`Starting` (same arguments)."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Starting[T]:
        return Starting(func(*args, **kwargs))

    return wrapper
