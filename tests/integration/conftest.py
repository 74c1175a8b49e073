"""Integration fixtures: skip without root, /dev/kvm or the real binaries; prove cleanup.

- Where integration tests can run (root, /dev/kvm, firecracker and jailer: as in CI on this
  machine) a skipped one fails the run, so a broken prerequisite (a missing extra, a guest
  that no longer builds) cannot pass silently. Explicit opt-ins are marked
  ``@pytest.mark.opt_in("<how to enable>")`` (the soak); a developer on another host may
  accept skips with ``IRONCLAW_ALLOW_INTEGRATION_SKIPS=1``.
- After every integration test, nothing of any VM id it claimed in this process (the
  registry's record-before-make claim), nor of its ``vm_id`` fixture, may remain on the host
  (:mod:`leftovers`: processes, jails, cgroups, netns, links, run dirs, records, sockets).
  The same is checked again for every such id at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from leftovers import leftovers

from ironclaw_orchestrator.registry import Registry

ALLOW_SKIPS_ENV = "IRONCLAW_ALLOW_INTEGRATION_SKIPS"
HERE = Path(__file__).resolve().parent


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (the jailer requires it)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not read/writable"
    for name, env in (("firecracker", "IRONCLAW_FIRECRACKER"), ("jailer", "IRONCLAW_JAILER")):
        if not (os.environ.get(env) or shutil.which(name)):
            return f"no {name} binary (put it on PATH or set {env}); see README 'Quick start'"
    return None


def skips_forbidden() -> bool:
    """True where integration tests can run and nobody accepted skips."""
    return _missing() is None and os.environ.get(ALLOW_SKIPS_ENV) != "1"


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _forbidden_skip_message(reason: str) -> str:
    return (
        f"integration test skipped on a host that can run it (root, /dev/kvm, firecracker and "
        f"jailer are present): {reason}. Fix what it lacks; mark an explicit opt-in "
        f"@pytest.mark.opt_in('<how to enable it>'); or set {ALLOW_SKIPS_ENV}=1 to accept "
        "skips on this host."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("integration") is None or item.get_closest_marker("opt_in"):
        return
    if skips_forbidden():
        report.outcome = "failed"
        report.longrepr = _forbidden_skip_message(_skip_reason(report.longrepr))


#: Modules skipped while importing where skips are forbidden: they fail the run at its end
#: (failing the collection itself would interrupt the whole run, unit tests included).
_SKIPPED_MODULES: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[Any]:
    """A whole module skipped while importing (``pytest.importorskip`` at module level)."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if (
        report.skipped
        and isinstance(collector, pytest.Module)
        and collector.path.parent == HERE
        and skips_forbidden()
    ):
        _SKIPPED_MODULES.append(f"{collector.nodeid}: {_skip_reason(report.longrepr)}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _SKIPPED_MODULES:
        terminalreporter.section("integration modules skipped where they must run", red=True)
        for line in _SKIPPED_MODULES:
            terminalreporter.line(_forbidden_skip_message(line))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED_MODULES and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --------------------------------------------------------------------------- leftovers

#: Every VM id claimed in this process during the session, with its registry's state dir.
_CLAIMED: dict[str, Path] = {}
#: Ids whose leftovers already failed their own test: not reported again at session end.
_REPORTED: set[str] = set()


def _left(claimed: dict[str, Path]) -> list[str]:
    found = [
        f"{vm_id}: {entry}"
        for vm_id, state in claimed.items()
        for entry in leftovers(vm_id, state_dirs=[state], vm_ids=[vm_id])
    ]
    _REPORTED.update(f.split(":", 1)[0] for f in found)
    return found


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """Fails the test if anything of a VM id it claimed (in this process) remains."""
    claimed: dict[str, Path] = {}
    real_claim = Registry.claim

    def claim(self: Registry, vm_id: str, **kw: Any) -> Any:
        claimed[vm_id] = self.state_dir
        return real_claim(self, vm_id, **kw)

    with pytest.MonkeyPatch.context() as mp:  # not the test's: its undo is its own
        mp.setattr(Registry, "claim", claim)
        yield
    _CLAIMED.update(claimed)
    left = _left(claimed)
    assert not left, f"test left VM resources behind: {left}"


@pytest.fixture(scope="session", autouse=True)
def _no_leftovers_at_session_end() -> Iterator[None]:
    """Something that outlived its test and came back (a supervisor re-creating a VM, a
    late VMM) is caught here."""
    yield
    left = _left({i: s for i, s in _CLAIMED.items() if i not in _REPORTED})
    assert not left, f"VM resources left at the end of the session: {left}"


@pytest.fixture
def real_host() -> None:
    reason = _missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def vm_id(real_host: None) -> Iterator[str]:
    """A unique VM id; after the test, nothing whose name contains it may remain."""
    ident = f"it-{uuid.uuid4().hex[:10]}"
    yield ident
    left = leftovers(ident)
    assert not left, f"test left VM resources behind: {left}"


@pytest.fixture
def exec_name(real_host: None) -> str:
    """The jailer's name for this host's firecracker (its resolved basename)."""
    from ironclaw_orchestrator.names import exec_file_name
    from ironclaw_orchestrator.vm.binaries import find_firecracker

    return exec_file_name(find_firecracker())


@pytest.fixture
def chroot_base() -> Path:
    base = Path("/var/jail")
    base.mkdir(mode=0o755, exist_ok=True)
    return base
