"""Removing a directory tree whose files belong to someone hostile (a VMM's chroot).

Relative to directory fds opened without following symlinks or crossing mounts
(:func:`.safefs.open_subdir_nofollow`), iteratively, with an optional budget for removals
run on an event loop. See :func:`remove_tree_at`.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import suppress
from pathlib import Path

from .safefs import open_dir_fd_nofollow, open_subdir_nofollow

__all__ = ["MAX_REMOVE_DEPTH", "OverBudget", "RemovalBudget", "remove_tree_at", "rmtree_nofollow"]


def rmtree_nofollow(
    path: Path,
    last: str | None = None,
    expected: tuple[str, ...] = (),
    budget: RemovalBudget | None = None,
) -> bool:
    """Remove the directory tree ``path``; ``False`` if it did not exist.

    No component of ``path`` (nor anything inside) is followed if it is a symlink: a path
    whose parent was swapped for a symlink raises ``OSError`` instead of deleting elsewhere.
    Nothing on another mount is touched: a mount point inside the tree (or the tree itself
    being one) raises ``OSError`` (EXDEV) before anything below it is removed. See
    :func:`remove_tree_at` for what a hostile owner of files inside can and cannot do.
    ``last``, an entry of ``path``, goes last (a marker saying whose the tree is, so that a
    removal cut short still reads as ours). ``expected`` names the files ``path`` usually
    holds: they are unlinked first, and if that empties it, it is removed without a listing.
    ``budget`` bounds the work (see :class:`RemovalBudget`).
    """
    try:
        parent = open_dir_fd_nofollow(path.parent)
    except FileNotFoundError:
        return False
    try:
        return remove_tree_at(parent, path.name, last, expected, budget)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise
    finally:
        os.close(parent)


class RemovalBudget:
    """How much a removal run on the event loop may do: file data freed (the cost that
    grows: the kernel frees each cached page of a file's last name) and entries.

    Each entry is charged before it is removed (a regular file with one link: one
    ``lstat``); one over the budget raises :class:`OverBudget` with it and the rest left in
    place, for a removal without a budget (in a thread) to finish. A hostile VMM that
    filled its jail then costs the event loop at most the budget, never the whole tree.
    """

    __slots__ = ("bytes_left", "entries_left")

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.bytes_left = max_bytes
        self.entries_left = max_entries

    def charge(self, dir_fd: int, name: str, is_dir: bool) -> None:
        self.entries_left -= 1
        if not is_dir:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None  # gone: nothing to free
            if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                self.bytes_left -= st.st_blocks * 512
        if self.bytes_left < 0 or self.entries_left < 0:
            raise OverBudget(name)


class OverBudget(Exception):
    """A budgeted removal stopped at this entry: the rest is for one without a budget."""


#: Deeper than this, a subtree is moved up to the top directory and taken later: removal
#: needs at most this many fds and no recursion, however deep a hostile tree is.
MAX_REMOVE_DEPTH = 32


def remove_tree_at(
    parent_fd: int,
    name: str,
    last: str | None = None,
    expected: tuple[str, ...] = (),
    budget: RemovalBudget | None = None,
) -> bool:
    """Remove the directory ``name`` in ``parent_fd`` and all in it; ``False`` if absent.

    Built for trees whose files belong to someone hostile (a VMM's chroot): each directory
    is opened by one name relative to its parent's fd with ``O_NOFOLLOW`` (and, where the
    kernel has ``openat2``, ``RESOLVE_NO_XDEV``), everything else is only unlinked, never
    opened: a symlink is removed as a link, a hard link as a name (its inode and other
    names stay), a fifo or device node without being opened. An entry swapped for another
    kind between listing and removal is taken as what it now is. The walk is iterative and
    moves subtrees deeper than ``MAX_REMOVE_DEPTH`` up to the top directory (a rename within
    the tree), so a deep tree costs neither recursion nor fds.

    Per directory: one open, one listing (``scandir``'s ``d_type``, no stat per entry), one
    ``rmdir``; per other entry one ``unlink`` (and with a ``budget``, one ``lstat``).
    """
    try:
        top = open_subdir_nofollow(parent_fd, name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OSError(exc.errno, "not a directory (a symlink?), not removed") from None
        raise
    # (fd of the directory's parent, its name there, its own fd, entries left to remove)
    stack: list[tuple[int, str, int, list[tuple[str, bool]]]] = []
    try:
        try:
            emptied = False
            if expected:
                _unlink_expected(top, expected, budget)
                emptied = last is None and _rmdir_if_empty(parent_fd, name)
            entries = [] if emptied else _entries(top, budget)
        except BaseException:
            os.close(top)
            raise
        if emptied:
            os.close(top)
            return True
        if last is not None:  # popped from the end: put it first
            entries.sort(key=lambda e: e[0] != last)
        stack.append((parent_fd, name, top, entries))
        moved = 0
        while stack:
            fd, entries = stack[-1][2], stack[-1][3]
            if not entries:
                parent, dname, _, _ = stack.pop()
                os.close(fd)
                with suppress(FileNotFoundError):
                    os.rmdir(dname, dir_fd=parent)
                continue
            child, is_dir = entries[-1]
            if budget is not None:
                budget.charge(fd, child, is_dir)  # raises with the entry still listed
            entries.pop()
            if not is_dir:
                try:
                    os.unlink(child, dir_fd=fd)
                    continue
                except FileNotFoundError:
                    continue
                except IsADirectoryError:
                    pass  # a directory now: taken below
            if len(stack) >= MAX_REMOVE_DEPTH:
                while True:
                    moved += 1
                    up = f".ironclaw-rm-{moved}"
                    try:
                        os.rename(child, up, src_dir_fd=fd, dst_dir_fd=top)
                        break
                    except OSError as exc:  # the name is taken: try the next
                        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                            raise
                stack[0][3].append((up, True))
                continue
            try:
                sub = open_subdir_nofollow(fd, child)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                if budget is not None:  # listed as a directory, charged as what it is now
                    budget.charge(fd, child, False)
                with suppress(FileNotFoundError):  # a symlink or file now: removed as such
                    os.unlink(child, dir_fd=fd)
                continue
            try:
                stack.append((fd, child, sub, _entries(sub, budget)))
            except BaseException:
                os.close(sub)
                raise
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)
    return True


def _unlink_expected(fd: int, expected: tuple[str, ...], budget: RemovalBudget | None) -> None:
    for entry in expected:
        if budget is not None:
            budget.charge(fd, entry, False)
        with suppress(FileNotFoundError, IsADirectoryError):  # a directory: the walk's
            os.unlink(entry, dir_fd=fd)


def _rmdir_if_empty(parent_fd: int, name: str) -> bool:
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _entries(fd: int, budget: RemovalBudget | None = None) -> list[tuple[str, bool]]:
    """``(name, is a directory)`` for each entry (from ``d_type``: no stat per entry). With a
    budget, a directory holding more names than it has left is not listed to its end."""
    limit = None if budget is None else max(budget.entries_left, 0)
    out: list[tuple[str, bool]] = []
    with os.scandir(fd) as it:
        for e in it:
            if limit is not None and len(out) >= limit:
                raise OverBudget(e.name)
            out.append((e.name, e.is_dir(follow_symlinks=False)))
    return out
