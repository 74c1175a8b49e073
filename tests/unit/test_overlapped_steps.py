"""The start's overlapped steps: the network namespace, the cgroups and the staging run at
once, in the order the record needs (record, then cgroups), and a failure or a cancel at
any point still removes exactly what was made, after every step has ended.

The namespace step is a stand-in (making a real one needs root; the real one is covered by
tests/integration/test_cancel_real.py): it records the resources as the real one does,
then "makes" a namespace file the stand-in jailer accepts.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import pytest
from standin_host import StandinHost, make_host

from ironclaw_orchestrator.errors import ConfigError
from ironclaw_orchestrator.vm import jailer
from ironclaw_orchestrator.vm.cancelsafe import ThreadSteps
from ironclaw_orchestrator.vm.jailer import JailFile, JailResources, start_with_jailer


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandinHost]:
    yield from make_host(monkeypatch, 1)


class Steps:
    """A stand-in network step and a watched cgroup step, with the order they ran in."""

    def __init__(self, host: StandinHost, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[str] = []
        self.recorded = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.fail_before_record = False
        self.fail_after_record = False
        self.netns_file = host.root / "netns-standin"
        real_prepare = jailer.cg.VmCgroups.prepare

        def make_network(res: JailResources, config: Any, *args: object) -> str:
            if self.fail_before_record:
                raise ConfigError("namespace name taken")
            res.changed()
            self.recorded.set()
            assert self.go.wait(10)
            if self.fail_after_record:
                raise OSError("netlink refused")
            self.netns_file.write_text("")
            self.events.append("netns made")
            return str(self.netns_file)

        def prepare(cgroups: Any) -> None:
            recorded = "recorded jail=True" in self.events  # on_change has returned
            self.events.append(f"cgroups after record: {recorded}")
            real_prepare(cgroups)
            self.events.append("cgroups made")

        monkeypatch.setattr(jailer, "_make_network", make_network)
        monkeypatch.setattr(jailer.cg.VmCgroups, "prepare", prepare)

    def on_change(self, res: JailResources) -> None:
        self.events.append(f"recorded jail={res.jail_dir is not None}")


def start(host: StandinHost, steps: Steps) -> asyncio.Future[Any]:
    cfg = host.jailer_config(isolate_network=True)
    files = [JailFile(host.images / "vmlinux", PurePosixPath("/vmlinux"))]
    return asyncio.ensure_future(
        start_with_jailer(cfg, files=files, ready_timeout_s=30, on_change=steps.on_change)
    )


async def test_cgroups_prepared_after_the_record_while_the_namespace_is_made(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = host.snapshot()
    steps = Steps(host, monkeypatch)
    steps.go.clear()  # the namespace step holds until the cgroups are made
    task = start(host, steps)
    for _ in range(500):
        if "cgroups made" in steps.events:
            break
        await asyncio.sleep(0.01)
    steps.go.set()
    assert steps.events == ["recorded jail=True", "cgroups after record: True", "cgroups made"]
    assert not task.done()  # the VMM waited for its namespace
    vmm = await task
    try:
        assert steps.events[-1] == "netns made"
        assert host.cgroup_dirs() and (vmm.chroot_dir / "vmlinux").exists()
    finally:
        await vmm.stop()
    steps.netns_file.unlink()
    assert host.snapshot() == before


@pytest.mark.parametrize("when", ["before the record", "after the record"])
async def test_a_failed_namespace_step_leaves_nothing(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    before = host.snapshot()
    steps = Steps(host, monkeypatch)
    steps.fail_before_record = when == "before the record"
    steps.fail_after_record = when == "after the record"
    with pytest.raises((ConfigError, OSError)):
        await start(host, steps)
    if steps.fail_before_record:
        assert steps.events == []  # nothing recorded, no cgroups started
    else:
        assert steps.events[0] == "recorded jail=True"
    assert host.cgroup_dirs() == []
    assert host.snapshot() == before


async def test_cancelled_while_the_namespace_step_runs_leaves_nothing(
    host: StandinHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = host.snapshot()
    steps = Steps(host, monkeypatch)
    steps.go.clear()
    task = start(host, steps)
    assert await asyncio.to_thread(steps.recorded.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    task.cancel()  # again, during the rollback that waits for the namespace step
    await asyncio.sleep(0.02)
    assert not task.done()  # the rollback waits for the step still running
    steps.go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "netns made" in steps.events  # finished after the cancel ...
    steps.netns_file.unlink()  # (the stand-in's file: not a resource the start records)
    assert host.cgroup_dirs() == []  # ... and everything the start made is gone
    assert host.snapshot() == before


async def test_settle_waits_for_every_started_step() -> None:
    steps = ThreadSteps()
    gates = [threading.Event(), threading.Event()]
    done: list[int] = []

    def step(i: int) -> int:
        assert gates[i].wait(10)
        done.append(i)
        return i

    first, second = steps.start(step, 0), steps.start(step, 1)
    settling = asyncio.ensure_future(steps.settle())
    gates[1].set()
    assert await steps.join(second) == 1
    await asyncio.sleep(0.02)
    assert not settling.done()  # the first step still runs
    gates[0].set()
    await settling
    assert done == [1, 0] and first.result() == 0
