"""Files the task's own processes map shared and writable.

A file written through a shared mapping (``mmap(..., MAP_SHARED)``, ``numpy.memmap``)
changes without a ``write()``: a store to a page that is already dirty moves neither its
mtime nor its ctime, so a hardlink snapshot of it can change under the upload with no
fingerprint to show it. Such files must be frozen by a copy, in ``save()``.

What can be seen is the task's own: this process and the processes it started (its
children, theirs, and so on), each of whose ``/proc/<pid>/maps`` is one small read. A
mapping held by an unrelated process (another task, a tool started elsewhere) cannot be
seen here.
"""

from __future__ import annotations

import os
import re

__all__ = ["shared_writable_files"]

# address perms offset dev inode [path]: perms "rw?s" is shared and writable. Searched
# from the literal (ten times faster than anchoring each line): a path that happens to
# hold the same text adds a number to the set, which costs a copy, never a miss.
_SHARED_WRITABLE = re.compile(rb" rw[-x]s \S+ \S+ (\d+)")


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started, from the ``children`` list of each of its threads."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            continue  # the thread (or the process) has exited meanwhile
    return out


def _task_pids(root: int) -> list[int]:
    """``root`` and every process descended from it that is still running."""
    seen = {root}
    order = [root]
    i = 0
    while i < len(order):
        for child in _children(order[i]):
            if child not in seen:
                seen.add(child)
                order.append(child)
        i += 1
    return order


def shared_writable_files(root: int | None = None) -> frozenset[int]:
    """The inode numbers of every file mapped shared and writable by process ``root``
    (this one by default) or a process descended from it.

    Inode numbers alone: the device a mapping shows is its filesystem's, which is not the
    ``st_dev`` a stat gives on overlayfs (containers) or btrfs subvolumes. A number that
    a file on another filesystem shares costs that file a needless copy, never a missed
    one. Empty where ``/proc`` cannot be read; a process that exits meanwhile is skipped.
    """
    found: set[int] = set()
    for pid in _task_pids(os.getpid() if root is None else root):
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                maps = f.read()
        except OSError:
            continue
        found.update(int(m.group(1)) for m in _SHARED_WRITABLE.finditer(maps))
    found.discard(0)  # anonymous shared memory
    return frozenset(found)

