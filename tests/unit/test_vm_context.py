"""``async with start_firecracker(...) as vm``: stopped on exit, on exceptions, on cancellation."""

from __future__ import annotations

import asyncio

import pytest

from ironclaw_orchestrator.errors import CleanupError
from ironclaw_orchestrator.vm import FirecrackerProcess
from ironclaw_orchestrator.vm.context import Starting, awaitable_context, stop_on_exit
from ironclaw_orchestrator.vm.jailer import JailerProcess


class FakeVm:
    """Stands in for a VM handle: counts stops; a stop can be slow or fail."""

    def __init__(self, *, stop_delay: float = 0.0, fail: bool = False) -> None:
        self.vm_id = "fake"
        self.stops = 0
        self.stopped = False
        self.stop_delay = stop_delay
        self.fail = fail

    async def stop(self) -> None:
        self.stops += 1
        await asyncio.sleep(self.stop_delay)
        if self.fail:
            raise CleanupError("fake: jail dir left behind")
        self.stopped = True


@awaitable_context
async def start_fake(vm: FakeVm, *, fail_start: bool = False) -> FakeVm:
    await asyncio.sleep(0)
    if fail_start:
        raise RuntimeError("start failed")
    return vm


async def test_await_gives_the_handle_without_stopping_it() -> None:
    vm = FakeVm()
    starting = start_fake(vm)
    assert isinstance(starting, Starting)
    assert await starting is vm
    assert vm.stops == 0


async def test_async_with_stops_on_normal_exit() -> None:
    vm = FakeVm()
    async with start_fake(vm) as got:
        assert got is vm and vm.stops == 0
    assert vm.stopped and vm.stops == 1


async def test_async_with_stops_on_exception_and_keeps_it() -> None:
    vm = FakeVm()
    with pytest.raises(ValueError, match="boom"):
        async with start_fake(vm):
            raise ValueError("boom")
    assert vm.stopped


async def test_failed_start_enters_nothing_and_stops_nothing() -> None:
    vm = FakeVm()
    with pytest.raises(RuntimeError, match="start failed"):
        async with start_fake(vm, fail_start=True):
            pytest.fail("the block must not run")
    assert vm.stops == 0


async def test_cancelled_block_still_stops_the_vm() -> None:
    vm = FakeVm(stop_delay=0.05)
    entered = asyncio.Event()

    async def body() -> None:
        async with start_fake(vm):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vm.stopped


async def test_a_second_cancel_during_the_stop_waits_for_it_to_finish() -> None:
    vm = FakeVm(stop_delay=0.2)
    stopping = asyncio.Event()
    original_stop = vm.stop

    async def stop() -> None:
        stopping.set()
        await original_stop()

    vm.stop = stop  # type: ignore[method-assign]

    async def body() -> None:
        async with start_fake(vm):
            pass

    task = asyncio.create_task(body())
    await stopping.wait()
    task.cancel()  # arrives while the VM is being stopped
    with pytest.raises(asyncio.CancelledError):
        await task
    assert vm.stopped  # the stop ran to the end before the cancellation went on


async def test_cleanup_failure_after_clean_block_is_raised() -> None:
    vm = FakeVm(fail=True)
    with pytest.raises(CleanupError, match="left behind"):
        async with start_fake(vm):
            pass


async def test_cleanup_failure_does_not_hide_the_blocks_exception() -> None:
    vm = FakeVm(fail=True)
    with pytest.raises(ValueError) as info:
        async with start_fake(vm):
            raise ValueError("the real problem")
    assert any("left behind" in note for note in info.value.__notes__)


async def test_stop_on_exit_with_no_exception_returns() -> None:
    vm = FakeVm()
    await stop_on_exit(vm, None)
    assert vm.stopped


def test_handles_are_async_context_managers() -> None:
    for cls in (FirecrackerProcess, JailerProcess):
        assert hasattr(cls, "__aenter__") and hasattr(cls, "__aexit__")


async def test_starting_can_be_closed_unawaited() -> None:
    starting = start_fake(FakeVm())
    starting.close()  # no 'coroutine was never awaited' warning
