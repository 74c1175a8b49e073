"""tests/integration/conftest.py: where integration tests can run, a skip fails the run."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "integration_conftest", TESTS / "integration" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
guards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guards)
ALLOW_SKIPS_ENV = guards.ALLOW_SKIPS_ENV
_missing = guards._missing

INNER = """
import pytest

pytestmark = pytest.mark.integration

def test_runs():
    pass

def test_skips_for_want_of_something():
    pytest.skip("cannot build the test guest")

@pytest.mark.skipif(True, reason="needs a thing")
def test_skipif():
    pass

@pytest.mark.opt_in("set IRONCLAW_SOAK=1")
@pytest.mark.skipif(True, reason="set IRONCLAW_SOAK=1")
def test_explicit_opt_in():
    pass
"""

IMPORT_SKIP = """
import pytest
pytest.importorskip("no_such_module_ironclaw", reason="not installed")

def test_never_collected():
    pass
"""


def _suite(pytester: pytest.Pytester) -> None:
    sub = pytester.path / "integration"
    sub.mkdir()
    shutil.copy(TESTS / "integration" / "conftest.py", sub / "conftest.py")
    shutil.copy(TESTS / "leftovers.py", pytester.path / "leftovers.py")
    (sub / "test_inner.py").write_text(INNER)
    (sub / "test_imports.py").write_text(IMPORT_SKIP)
    (pytester.path / "test_unit_skip.py").write_text(
        "import pytest\n\ndef test_unit():\n    pytest.skip('unit tests may skip')\n"
    )
    pytester.makeini("[pytest]\nmarkers =\n    integration: x\n    opt_in(how): y\n")


@pytest.mark.skipif(_missing() is not None, reason=f"this host cannot run them: {_missing()}")
def test_skipped_integration_tests_fail_where_they_can_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ALLOW_SKIPS_ENV, raising=False)
    _suite(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=3)  # skipif: at setup
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert "integration modules skipped where they must run" in out
    assert "skipped on a host that can run it" in out and "cannot build the test guest" in out
    assert "needs a thing" in out and "not installed" in out
    assert "SKIPPED [1] test_unit_skip.py" in out  # unit tests are not concerned
    assert "set IRONCLAW_SOAK=1" in out  # the opt-in is skipped, with its reason


def test_skips_are_accepted_on_request(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ALLOW_SKIPS_ENV, "1")
    _suite(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=5)
    assert result.ret == pytest.ExitCode.OK


def test_every_test_has_a_deadline(pytestconfig: pytest.Config) -> None:
    """pytest-timeout is installed (dev extra) and pyproject sets a default for every test."""
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert float(pytestconfig.getini("timeout")) > 0


CLAIMS = """
import secrets
from ironclaw_orchestrator.registry import Registry

def test_claims_and_forgets(tmp_path):
    Registry(tmp_path / "state").claim("lo-forgotten-" + secrets.token_hex(4))

def test_claims_and_releases(tmp_path):
    registry = Registry(tmp_path / "state")
    vm_id = "lo-released-" + secrets.token_hex(4)
    registry.claim(vm_id)
    registry.release(vm_id)
"""


def test_every_claimed_id_is_checked_for_leftovers(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The autouse check sees ids a test claims itself (here a record left in its own state
    dir), not only the ``vm_id`` fixture's."""
    monkeypatch.setenv(ALLOW_SKIPS_ENV, "1")
    sub = pytester.path / "integration"
    sub.mkdir()
    shutil.copy(TESTS / "integration" / "conftest.py", sub / "conftest.py")
    shutil.copy(TESTS / "leftovers.py", pytester.path / "leftovers.py")
    (sub / "test_claims.py").write_text(CLAIMS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    out = result.stdout.str()
    assert "ERROR at teardown of test_claims_and_forgets" in out
    assert "test left VM resources behind" in out and "registry record" in out
    assert "lo-released-" not in out
