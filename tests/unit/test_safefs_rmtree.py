"""Removing a tree whose files belong to someone hostile (a VMM's chroot, owned by its uid):
what a compromised VMM can plant in its jail never makes the removal touch anything else,
and the removal does a bounded amount of work (one open and one listing per directory, no
stat per entry, no recursion however deep)."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ironclaw_orchestrator import names, safefs, safetree
from ironclaw_orchestrator.vm import cleanup


def _outside(tmp_path: Path) -> tuple[Path, Path]:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep")
    return precious, precious / "data"


def _hostile_jail(tmp_path: Path, precious: Path, data: Path) -> Path:
    """A jail as the jailer lays it out, plus what a compromised VMM could plant in it."""
    jail = cleanup.claim_jail_dir(tmp_path / "fc" / "vm-1", "vm-1")
    root = jail / "root"
    (root / "dev" / "net").mkdir(parents=True)
    (root / "run").mkdir()
    (root / "firecracker").write_bytes(b"\x7fELF")
    (root / "firecracker.pid").write_text("1\n")
    os.mkfifo(root / "dev" / "fifo")  # opening it would block: it must only be unlinked
    if os.geteuid() == 0:
        os.mknod(root / "dev" / "kvm", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "run" / "firecracker.socket"))
    sock.close()
    (root / "run" / "escape").symlink_to(precious)  # a symlink to a directory outside
    (root / "dev" / "data").symlink_to(data)  # ... and to a file outside
    (root / "dangling").symlink_to("/nonexistent/../../etc")
    os.link(data, root / "hardlink")  # a hard link to a file outside
    locked = root / "locked"
    locked.mkdir()
    (locked / "inner").write_text("x")
    os.chmod(locked, 0)  # unreadable to its owner: root removes it all the same
    sticky = root / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    (sticky / "f").write_text("x")
    return jail


def test_hostile_jail_contents_are_removed_and_nothing_outside(tmp_path: Path) -> None:
    precious, data = _outside(tmp_path)
    jail = _hostile_jail(tmp_path, precious, data)
    cleanup.remove_jail_tree(jail)
    assert not os.path.lexists(jail)
    assert sorted(p.name for p in (tmp_path / "fc").iterdir()) == []
    assert data.read_text() == "keep" and data.stat().st_nlink == 1  # only the link went
    assert sorted(p.name for p in precious.iterdir()) == ["data"]
    cleanup.remove_jail_tree(jail)  # gone already: fine (gc after a stop, a second stop)


def test_a_deep_tree_needs_no_recursion_and_few_fds(tmp_path: Path) -> None:
    """Deeper than Python's recursion limit (shutil.rmtree raised RecursionError here), and
    removed holding at most MAX_REMOVE_DEPTH directory fds."""
    top = tmp_path / "fc" / "vm-1"
    top.mkdir(parents=True)
    depth = sys.getrecursionlimit() + 500
    (top / ".ironclaw-rm-1").write_text("x")  # a name the walk would move a subtree to
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(depth):
            os.mkdir("d", dir_fd=fd)
            if i % 97 == 0:
                os.close(os.open(f"f{i}", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    open_fds = len(os.listdir("/proc/self/fd"))
    peak = [0]
    real_entries = safetree._entries

    def watching(fd: int, budget: object = None) -> list[tuple[str, bool]]:
        peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")) - open_fds)
        return real_entries(fd)

    mp = pytest.MonkeyPatch()
    mp.setattr(safetree, "_entries", watching)
    try:
        assert safetree.rmtree_nofollow(top) is True
    finally:
        mp.undo()
        # pytest removes old temp dirs with shutil.rmtree, which a tree this deep breaks
        safetree.rmtree_nofollow(top)
    assert not os.path.lexists(top)
    assert peak[0] <= safetree.MAX_REMOVE_DEPTH + 3  # + the parent, scandir's dup, listdir


def test_entries_swapped_after_listing_are_taken_as_what_they_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listed as a directory, now a symlink to one outside; listed as a file, now a
    directory: the symlink is unlinked (its target kept), the directory removed."""
    precious, data = _outside(tmp_path)
    top = tmp_path / "t"
    (top / "was_dir").mkdir(parents=True)
    (top / "was_file").write_text("x")
    real_entries = safetree._entries

    def swapping(fd: int, budget: object = None) -> list[tuple[str, bool]]:
        listed = real_entries(fd)
        if (top / "was_dir").is_dir() and not (top / "was_dir").is_symlink():
            (top / "was_dir").rmdir()
            (top / "was_dir").symlink_to(precious)
            (top / "was_file").unlink()
            (top / "was_file").mkdir()
            (top / "was_file" / "inner").write_text("x")
        return listed

    monkeypatch.setattr(safetree, "_entries", swapping)
    safetree.rmtree_nofollow(top)
    assert not os.path.lexists(top)
    assert data.read_text() == "keep" and sorted(p.name for p in precious.iterdir()) == ["data"]


def test_the_marker_goes_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A removal cut short (SIGKILL) leaves a jail that still carries our marker, so gc
    still knows it as ours and removes the rest with this same function."""
    jail = cleanup.claim_jail_dir(tmp_path / "fc" / "vm-1", "vm-1")
    for name in ("a", "zz", "root"):
        (jail / name).mkdir()
        (jail / name / "f").write_text("x")
    removed: list[str] = []
    real_unlink, real_rmdir = os.unlink, os.rmdir

    def unlink(path: str, *, dir_fd: int | None = None) -> None:
        removed.append(path)
        real_unlink(path, dir_fd=dir_fd)

    def rmdir(path: str, *, dir_fd: int | None = None) -> None:
        removed.append(path + "/")
        real_rmdir(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "rmdir", rmdir)
    cleanup.remove_jail_tree(jail)
    assert removed[-2:] == [names.JAIL_MARKER, "vm-1/"]


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls: dict[str, int] = {"stat": 0, "lstat": 0, "scandir": 0, "open": 0, "openat2": 0}

    def count(name: str, real: object) -> object:
        def counted(*a: object, **kw: object) -> object:
            calls[name] += 1
            return real(*a, **kw)  # type: ignore[operator]

        return counted

    for name in ("stat", "lstat", "scandir", "open"):
        monkeypatch.setattr(os, name, count(name, getattr(os, name)))
    monkeypatch.setattr(safefs, "_openat2", count("openat2", safefs._openat2))
    return calls


def test_removal_work_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work count: a jail as the jailer lays it out is removed with one open and one listing
    per directory, one unlink per entry, no stat (d_type decides), and the parent reached
    with one open where the kernel has openat2 (not one per path component)."""
    jail = cleanup.claim_jail_dir(tmp_path / "firecracker-v1.0.0" / "vm-1", "vm-1")
    root = jail / "root"
    (root / "dev" / "net").mkdir(parents=True)
    (root / "run").mkdir()
    for name in ("dev/kvm", "dev/urandom", "dev/net/tun", "run/firecracker.socket",
                 "firecracker-v1.0.0", "firecracker-v1.0.0.pid", "vmlinux"):  # fmt: skip
        (root / name).write_text("x")
    calls = _counting(monkeypatch)
    cleanup.remove_jail_tree(jail)
    assert calls["stat"] == calls["lstat"] == 0
    assert calls["scandir"] == 5  # the jail, root, dev, dev/net, run
    if safefs._HAVE_OPENAT2:
        assert calls["openat2"] == 1 + 5 and calls["open"] == 0  # parent + 5 directories
    assert not os.path.lexists(jail)
    # The run directory: its console log unlinked without listing it.
    monkeypatch.setenv("IRONCLAW_RUN_DIR", str(tmp_path / "run"))
    from ironclaw_orchestrator.vm import rundir

    run_dir = rundir.create_vm_run_dir("vm-1")
    (run_dir / rundir.CONSOLE_LOG).write_text("x")
    calls["scandir"] = 0
    cleanup.remove_run_dir(run_dir)
    assert calls["scandir"] == 0 and not os.path.lexists(run_dir)
    run_dir = rundir.create_vm_run_dir("vm-1")
    (run_dir / "console.log.1").write_text("x")  # something else: found by listing
    cleanup.remove_run_dir(run_dir)
    assert calls["scandir"] == 1 and not os.path.lexists(run_dir)


def test_hostile_removal_stats_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    precious, data = _outside(tmp_path)
    jail = _hostile_jail(tmp_path, precious, data)
    os.chmod(jail / "root" / "locked", 0o700)
    dirs = [p for p in jail.rglob("*") if p.is_dir() and not p.is_symlink()] + [jail]
    calls = _counting(monkeypatch)
    cleanup.remove_jail_tree(jail)
    assert calls["stat"] == calls["lstat"] == 0 and calls["scandir"] <= len(dirs)
    assert not os.path.lexists(jail) and data.read_text() == "keep"
    if not safefs._HAVE_OPENAT2:  # the fallback walks the parent's components from /
        assert calls["open"] <= len(dirs) + len(jail.parent.parts)


def test_without_openat2_the_walk_is_as_safe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels before 5.6 (or a seccomp filter denying openat2): O_NOFOLLOW per component."""
    monkeypatch.setattr(safefs, "_HAVE_OPENAT2", False)
    precious, data = _outside(tmp_path)
    jail = _hostile_jail(tmp_path, precious, data)
    cleanup.remove_jail_tree(jail)
    assert not os.path.lexists(jail) and data.read_text() == "keep"
    base = tmp_path / "base"
    base.mkdir()
    (base / "fc").symlink_to(precious)
    with pytest.raises(OSError):
        safetree.rmtree_nofollow(base / "fc" / "data")
    assert data.read_text() == "keep"


@pytest.mark.skipif(os.geteuid() != 0, reason="bind-mounting needs root")
def test_a_mount_inside_is_refused_and_nothing_below_it_removed(tmp_path: Path) -> None:
    """Only root in the host's mount namespace can mount there (the jailer's own mounts
    stay in its namespace), but if one appears, the files of the other mount are kept."""
    if not safefs._HAVE_OPENAT2:
        pytest.skip("needs openat2 (Linux 5.6+)")
    precious, data = _outside(tmp_path)
    top = tmp_path / "fc" / "vm-1"
    (top / "root" / "mnt").mkdir(parents=True)
    (top / "root" / "file").write_text("x")
    mnt = top / "root" / "mnt"
    subprocess.run(["mount", "--bind", str(precious), str(mnt)], check=True)
    try:
        with pytest.raises(OSError) as info:
            safetree.rmtree_nofollow(top)
        assert info.value.errno == errno.EXDEV and "mount point" in str(info.value)
        assert data.read_text() == "keep"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    safetree.rmtree_nofollow(top)
    assert not os.path.lexists(top) and data.read_text() == "keep"


def test_claim_work_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work count: a claim makes one directory and one file (its marker), and no mkdir of
    the exec directory once it exists; its first claim makes that too."""
    made: list[str] = []
    real_mkdir, real_open = os.mkdir, os.open

    def mkdir(path: str, mode: int = 0o777, **kw: object) -> None:
        made.append(f"mkdir {Path(path).name}")
        real_mkdir(path, mode, **kw)  # type: ignore[arg-type]

    def open_(path: str, flags: int, mode: int = 0o777, **kw: object) -> int:
        if flags & os.O_CREAT:
            made.append(f"create {Path(path).name}")
        return real_open(path, flags, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    cleanup.claim_jail_dir(tmp_path / "fc" / "vm-1", "vm-1")
    marker = f"create {names.JAIL_MARKER}"
    assert [m.split("-")[0] for m in made] == ["mkdir .claim", "mkdir fc", "mkdir .claim", marker]
    made.clear()
    cleanup.claim_jail_dir(tmp_path / "fc" / "vm-2", "vm-2")
    assert [m.split("-")[0] for m in made] == ["mkdir .claim", marker]
    monkeypatch.undo()
    assert (tmp_path / "fc" / "vm-2" / names.JAIL_MARKER).is_file()


def test_run_dir_work_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ironclaw_orchestrator.vm import rundir

    monkeypatch.setenv(rundir.RUN_DIR_ENV, str(tmp_path / "run"))
    made: list[str] = []
    real_mkdir = os.mkdir

    def mkdir(path: str, mode: int = 0o777, **kw: object) -> None:
        made.append(Path(path).name)
        real_mkdir(path, mode, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "mkdir", mkdir)
    first = rundir.create_vm_run_dir("vm-1")
    made.clear()
    second = rundir.create_vm_run_dir("vm-2")
    assert made == ["vm-2"]  # one mkdir once the run root exists
    for path in (first, second):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        cleanup.remove_run_dir(path)
        assert not os.path.lexists(path)


def test_a_budget_stops_before_a_big_file_and_a_full_removal_finishes(tmp_path: Path) -> None:
    """What a stop removes on its event loop is bounded: a file whose last name would free
    more than the budget stops the removal with that file and our marker still in place (gc
    still knows the jail as ours); a removal without a budget (in a thread) finishes it."""
    precious, data = _outside(tmp_path)
    jail = _hostile_jail(tmp_path, precious, data)
    big = jail / "root" / "mem"
    big.write_bytes(b"x" * (1 << 20))
    with pytest.raises(safetree.OverBudget):
        cleanup.remove_jail_tree(jail, safetree.RemovalBudget(1 << 20, 1000))
    assert big.exists() and (jail / names.JAIL_MARKER).exists()
    cleanup.remove_jail_tree(jail)
    assert not jail.exists() and data.read_text() == "keep"


def test_a_budget_charges_data_freed_and_entries(tmp_path: Path) -> None:
    """Only a regular file's last name frees its data: another name of a big file (a hard
    link to an image) costs nothing, a sparse file only what it holds; every entry costs one
    of the entry budget, so a jail filled with many small files is bounded too."""
    image = tmp_path / "image"
    image.write_bytes(b"x" * (4 << 20))
    tree = tmp_path / "t"
    (tree / "d").mkdir(parents=True)
    os.link(image, tree / "d" / "linked")
    with open(tree / "sparse", "wb") as f:
        f.truncate(1 << 30)
    os.symlink(image, tree / "link")
    assert safetree.rmtree_nofollow(tree, budget=safetree.RemovalBudget(64 << 10, 4)) is True
    assert image.stat().st_size == 4 << 20
    many = tmp_path / "many"
    many.mkdir()
    for i in range(10):
        (many / str(i)).write_text("")
    with pytest.raises(safetree.OverBudget):  # more names than it may remove: none removed
        safetree.rmtree_nofollow(many, budget=safetree.RemovalBudget(1 << 20, 5))
    assert len(os.listdir(many)) == 10
    safetree.rmtree_nofollow(many)
    assert not many.exists()


def test_a_budget_counts_expected_files(tmp_path: Path) -> None:
    """The run directory's console log is unlinked without a listing, and charged all the same."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "console.log").write_bytes(b"x" * (1 << 20))
    with pytest.raises(safetree.OverBudget):
        safetree.rmtree_nofollow(
            run, expected=("console.log",), budget=safetree.RemovalBudget(4096, 9)
        )
    assert (run / "console.log").exists()


def test_a_budget_bounds_the_listing_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile VMM can fill a directory it owns (``<chroot>/run``) with millions of names:
    a budgeted removal stops listing once the names exceed what it may remove, before it
    has read them all (found by review: the whole directory was listed first)."""
    tree = tmp_path / "jail"
    (tree / "root").mkdir(parents=True)
    for i in range(5000):
        os.close(os.open(tree / "root" / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600))
    seen = [0]
    real_scandir = safetree.os.scandir

    class Counting:
        def __init__(self, fd: int) -> None:
            self.it = real_scandir(fd)

        def __enter__(self) -> Counting:
            return self

        def __exit__(self, *exc: object) -> None:
            self.it.close()

        def __iter__(self) -> Counting:
            return self

        def __next__(self) -> os.DirEntry[str]:
            seen[0] += 1
            return next(self.it)

    monkeypatch.setattr(safetree.os, "scandir", Counting)
    with pytest.raises(safetree.OverBudget):
        safetree.rmtree_nofollow(tree, budget=safetree.RemovalBudget(1 << 20, 16))
    assert seen[0] <= 32
    monkeypatch.undo()
    assert len(os.listdir(tree / "root")) == 5000
    safetree.rmtree_nofollow(tree)
    assert not tree.exists()
