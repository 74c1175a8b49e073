"""The reused namespace helper threads: a worker serves many jobs, goes home after each,
and ends (never serving again) if it cannot. No namespace is entered here (no root needed):
the jobs' ``enter`` steps are stand-ins; the real ones are in tests/integration."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Iterator

import pytest

from ironclaw_orchestrator.vm.netns import kernel


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[kernel._NetnsWorkers]:
    pool = kernel._NetnsWorkers()
    monkeypatch.setattr(kernel, "_WORKERS", pool)
    yield pool
    pool.close_idle()


def test_jobs_reuse_one_thread_and_each_goes_home(
    workers: kernel._NetnsWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work count: one thread started for many jobs; after each job (failed or not) the
    worker setns()-es back to the namespace it started in."""
    homes: list[int] = []
    monkeypatch.setattr(kernel, "_setns", homes.append)
    entered: list[str] = []
    tids = {kernel._run_in_new_netns(lambda: entered.append("in"), threading.get_ident)}
    for _ in range(4):
        tids.add(kernel._run_in_new_netns(lambda: entered.append("in"), threading.get_ident))
    with pytest.raises(OSError, match="refused"):
        kernel._run_in_new_netns(lambda: None, _raise(OSError(errno.EPERM, "refused")))
    assert workers.started == 1 and len(tids) == 1 and threading.get_ident() not in tids
    assert entered == ["in"] * 5
    assert len(homes) == 6 and len(set(homes)) == 1  # home after every job, the same fd


def test_a_worker_that_cannot_go_home_ends_and_is_not_reused(
    workers: kernel._NetnsWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stranded(fd: int) -> None:
        raise OSError(errno.ENOMEM, "cannot go home")

    monkeypatch.setattr(kernel, "_setns", stranded)
    threads: list[threading.Thread] = []

    # The job's own result still comes back: it ran where it was meant to.
    def job() -> int:
        threads.append(_me())
        return 7

    assert kernel._run_in_new_netns(lambda: None, job) == 7
    threads[0].join(timeout=10)
    assert not threads[0].is_alive()  # ended, leaving the foreign namespace with it
    monkeypatch.setattr(kernel, "_setns", lambda fd: None)
    kernel._run_in_new_netns(lambda: None, lambda: threads.append(_me()))
    assert workers.started == 2 and threads[1] is not threads[0]


def test_concurrent_jobs_get_their_own_workers_and_idle_ones_are_bounded(
    workers: kernel._NetnsWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "_setns", lambda fd: None)
    n = kernel._MAX_IDLE_WORKERS + 2
    barrier = threading.Barrier(n)
    results: list[int] = []

    def job(i: int) -> None:
        results.append(kernel._run_in_new_netns(lambda: None, lambda: barrier.wait(10) * 0 + i))

    callers = [threading.Thread(target=job, args=(i,)) for i in range(n)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert sorted(results) == list(range(n)) and workers.started == n
    assert len(workers._idle) == kernel._MAX_IDLE_WORKERS


def test_a_forked_child_forgets_the_parents_workers(workers: kernel._NetnsWorkers) -> None:
    """Threads do not survive a fork: a child handing a job to one would wait forever."""
    import os

    kernel._run_in_new_netns(lambda: None, lambda: None)
    assert len(workers._idle) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the real at-fork hook ran on the module's pool
        os.write(write, b"%d" % len(kernel._WORKERS._idle))
        os._exit(0)
    os.close(write)
    assert os.waitpid(pid, 0)[1] == 0 and os.read(read, 16) == b"0"
    os.close(read)


def test_idle_workers_can_be_ended(workers: kernel._NetnsWorkers) -> None:
    threads: list[threading.Thread] = []
    kernel._run_in_new_netns(lambda: None, lambda: threads.append(_me()))
    workers.close_idle()
    assert not threads[0].is_alive() and workers._idle == []


def _me() -> threading.Thread:
    return threading.current_thread()


def _raise(exc: BaseException) -> Callable[[], None]:
    def fn() -> None:
        raise exc

    return fn


def test_a_worker_made_outside_the_process_namespace_is_never_pooled(
    workers: kernel._NetnsWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its home is a foreign namespace: pooled, it would go back there after every job and
    keep that namespace (and its TAP) alive after it was removed."""
    monkeypatch.setattr(kernel, "_setns", lambda fd: None)
    monkeypatch.setattr(kernel, "_is_process_netns", lambda fd: False)
    kernel._run_in_new_netns(lambda: None, lambda: None)
    kernel._run_in_new_netns(lambda: None, lambda: None)
    assert workers.started == 2 and not workers._idle
