"""Making and removing a VM's host resources safely: atomic jail claim, no symlink followed,
no swappable base, a taken namespace never adopted."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ironclaw_orchestrator import names
from ironclaw_orchestrator.errors import ChrootBaseError, CleanupError, ConfigError
from ironclaw_orchestrator.safefs import check_not_swappable, check_run_root, swappable_reason
from ironclaw_orchestrator.safetree import rmtree_nofollow
from ironclaw_orchestrator.vm import cleanup
from ironclaw_orchestrator.vm import netns as ns
from ironclaw_orchestrator.vm.resources import JailResources


def test_jail_claim_is_atomic_and_marked(tmp_path: Path) -> None:
    jail = tmp_path / "fc" / "vm-1"
    assert cleanup.claim_jail_dir(jail, "vm-1") == jail
    marker = json.loads((jail / names.JAIL_MARKER).read_text())
    assert marker["vm_id"] == "vm-1" and marker["orchestrator_pid"] == os.getpid()
    assert stat.S_IMODE(jail.stat().st_mode) == 0o700
    (jail / "root").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        cleanup.claim_jail_dir(jail, "vm-1")
    assert (jail / "root").is_dir()  # the winner's jail is untouched
    assert sorted(p.name for p in (tmp_path / "fc").iterdir()) == ["vm-1"]  # no temp left


def test_an_empty_directory_is_not_replaced(tmp_path: Path) -> None:
    """Plain rename() would replace an empty directory someone else just made."""
    (tmp_path / "fc" / "vm-1").mkdir(parents=True)
    with pytest.raises(ConfigError):
        cleanup.claim_jail_dir(tmp_path / "fc" / "vm-1", "vm-1")
    assert not (tmp_path / "fc" / "vm-1" / names.JAIL_MARKER).exists()


def test_claim_names() -> None:
    assert cleanup.claim_id_of(".claim-vm-1-0a1b2c3d") == "vm-1"
    assert cleanup.claim_id_of(".claim-bad_id-0a1b2c3d") is None
    assert cleanup.claim_id_of("vm-1") is None


def test_remove_jail_dir_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    """Another user renames the VM's directory and plants a symlink: nothing else goes."""
    precious = tmp_path / "precious"
    (precious / "vm-1").mkdir(parents=True)
    (precious / "vm-1" / "data").write_text("keep")
    base = tmp_path / "base"
    base.mkdir()
    (base / "fc").symlink_to(precious)  # a swapped-in parent component
    with pytest.raises(OSError):
        cleanup.remove_jail_dir(base / "fc" / "vm-1")
    (tmp_path / "base2" / "fc").mkdir(parents=True)
    (tmp_path / "base2" / "fc" / "vm-1").symlink_to(precious / "vm-1")  # the dir itself
    with pytest.raises(OSError):
        rmtree_nofollow(tmp_path / "base2" / "fc" / "vm-1")
    assert (precious / "vm-1" / "data").read_text() == "keep"
    assert rmtree_nofollow(tmp_path / "nothing" / "here") is False


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_writable_bases_are_refused_with_the_reason(tmp_path: Path, mode: int) -> None:
    base = tmp_path / "jail"
    base.mkdir()
    os.chmod(base, mode)
    with pytest.raises(ChrootBaseError, match="writable by group or others") as info:
        check_not_swappable(base, "chroot base", ChrootBaseError)
    assert "chmod 755" in str(info.value)
    with pytest.raises(ConfigError, match="writable by group or others"):
        check_run_root(base)


def test_swappable_parents_and_links(tmp_path: Path) -> None:
    open_parent = tmp_path / "open"
    (open_parent / "base").mkdir(parents=True)
    os.chmod(open_parent, 0o777)
    assert "without the sticky bit" in (swappable_reason(open_parent / "base") or "")
    os.chmod(open_parent, 0o1777)  # sticky, like /tmp: others cannot rename our directory
    assert swappable_reason(open_parent / "base") is None
    (tmp_path / "link").symlink_to(open_parent / "base")
    assert "symlink" in (swappable_reason(tmp_path / "link") or "")
    assert swappable_reason(tmp_path / "missing", must_exist=False) is None


@pytest.fixture
def netns_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``/run/netns`` in a temporary directory (its shared-mount preparation skipped)."""
    from ironclaw_orchestrator.vm.netns import namespace

    monkeypatch.setattr(ns.names, "NETNS_DIR", tmp_path / "netns")  # where netns_path reads it
    monkeypatch.setattr(namespace, "_prepare_run_dir", lambda: None)
    (tmp_path / "netns").mkdir()
    return tmp_path / "netns"


def test_a_taken_namespace_is_refused_not_adopted(netns_dir: Path) -> None:
    """Two orchestrators, one id: the loser must not record (and so not delete) the netns."""
    assert cleanup.claim_netns("vm-1") == "ironclaw-vm-1"
    claim = netns_dir / "ironclaw-vm-1"
    assert claim.is_file() and claim.stat().st_size == 0  # empty: the namespace binds on it
    winner = claim.stat().st_ino
    with pytest.raises(ConfigError, match=r"already exists.*ironclaw gc"):
        cleanup.claim_netns("vm-1")
    assert claim.stat().st_ino == winner  # the loser touched nothing


def test_netns_claim_is_one_exclusive_create_and_no_lock(
    netns_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work count: claiming a name opens one file (O_EXCL) and takes no host lock, so no
    VM's namespace creation waits for another's."""
    import fcntl

    opened: list[tuple[str, int]] = []
    locked: list[object] = []
    real_open = os.open

    def counting_open(path: str, flags: int, *args: object, **kw: object) -> int:
        opened.append((str(path), flags))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(fcntl, "flock", lambda *a: locked.append(a))
    monkeypatch.setattr(fcntl, "lockf", lambda *a: locked.append(a))
    cleanup.claim_netns("vm-1")
    assert [p for p, _ in opened] == [str(netns_dir / "ironclaw-vm-1")]
    assert opened[0][1] & os.O_CREAT and opened[0][1] & os.O_EXCL
    assert locked == []


def test_concurrent_claims_of_one_id_have_one_winner(netns_dir: Path) -> None:
    import threading

    barrier = threading.Barrier(8)
    results: list[str] = []

    def claim() -> None:
        barrier.wait()
        try:
            cleanup.claim_netns("vm-1")
            results.append("won")
        except ConfigError:
            results.append("refused")

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused"] * 7 + ["won"]


def test_remove_network_removes_an_unbound_claim_and_follows_no_symlink(
    netns_dir: Path, tmp_path: Path
) -> None:
    """A crash (or a failed bind) between claim and namespace leaves a plain file: stop and
    gc remove it by name; a symlink there is removed, not its target."""
    cleanup.claim_netns("vm-1")
    cleanup.remove_network("ironclaw-vm-1", "vm-1", None, False)
    assert not os.path.lexists(netns_dir / "ironclaw-vm-1")
    cleanup.remove_network("ironclaw-vm-1", "vm-1", None, False)  # gone: fine
    target = tmp_path / "precious"
    target.write_text("keep")
    (netns_dir / "ironclaw-vm-2").symlink_to(target)
    cleanup.remove_network("ironclaw-vm-2", "vm-2", None, False)
    assert not os.path.lexists(netns_dir / "ironclaw-vm-2") and target.read_text() == "keep"


async def test_a_cancelled_start_step_finishes_before_rollback() -> None:
    """Rolling back while a threaded step still creates things would leak them."""
    import asyncio
    import threading

    from ironclaw_orchestrator.vm.jailer import _ThreadSteps

    steps = _ThreadSteps()
    release = threading.Event()
    made: list[str] = []

    def slow_make() -> None:
        release.wait(10)
        made.append("netns")

    task = asyncio.ensure_future(steps.run(slow_make))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert made == []  # still running in its thread
    asyncio.get_running_loop().call_later(0.05, release.set)
    await steps.settle()
    assert made == ["netns"]  # rollback may now see (and remove) it


def test_an_inline_release_leaves_what_fails_to_the_full_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop first removes on its event loop what is short; at a step that fails (or does not
    fit) it stops, with what it did marked done, and the full release (in a thread) redoes the
    rest and reports the failure."""
    jail = cleanup.claim_jail_dir(tmp_path / "fc" / "vm-1", "vm-1")
    run = tmp_path / "run"
    run.mkdir()
    (run / "console.log").write_text("boot\n")
    res = JailResources(vm_id="vm-1", jail_dir=jail, run_dir=run)
    real = cleanup.remove_jail_tree

    def denied(path: Path, budget: object = None) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cleanup, "remove_jail_tree", denied)
    assert res.release_inline() is False
    assert res.jail_dir == jail and (run / "console.log").exists()
    with pytest.raises(CleanupError) as err:
        res.release()
    assert any("Permission denied" in f for f in err.value.failures)
    assert res.run_dir is None and not run.exists()
    monkeypatch.setattr(cleanup, "remove_jail_tree", real)
    res.release()  # resumed: only the jail was left
    assert res.jail_dir is None and not jail.exists()


def test_an_inline_release_hands_on_what_it_must_not_do(tmp_path: Path) -> None:
    """A VMM not known (it may still run: found by a /proc scan) and network devices (netlink)
    are never done on the event loop: nothing is removed inline then."""
    jail = cleanup.claim_jail_dir(tmp_path / "fc" / "vm-1", "vm-1")
    for kw in ({"vmm_unknown": True}, {"tap": "tap0"}, {"uplink": True}):
        res = JailResources(vm_id="vm-1", jail_dir=jail, **kw)  # type: ignore[arg-type]
        assert res.release_inline() is False
        assert res.jail_dir == jail and jail.exists()
    res = JailResources(vm_id="vm-1", jail_dir=jail)
    assert res.release_inline() is True and not jail.exists()
