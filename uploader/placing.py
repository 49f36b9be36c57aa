"""Placing verified files under a destination, all or nothing, never through a symlink.

Loads of this package's checkpoints (:meth:`Engine.load <uploader.engine.Engine.load>`)
and of ``metaflow-checkpoint``'s archives both stage every file first, then place them
with :func:`place`.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable

__all__ = ["place"]


def place(staging: str, dest: str, paths: list[list[str]], *, kind: str,
          refuse: Callable[[str, str, str], Exception]) -> None:
    """Move the files in ``staging`` (named by index) to their ``paths`` under ``dest``.

    Never writes through a symlink already in ``dest``: a link where the ``kind`` (say,
    "checkpoint") has a directory is replaced by a directory, and one where it has a file
    by the file (the link itself, never its target). Checks every path before moving any
    file, so a conflict leaves ``dest`` as it was: it raises ``refuse(path, rel, what)``,
    ``what`` saying what is in the way.
    """
    dirs: dict[str, str] = {}  # directory -> "dir", "link" or "missing"
    for parts in paths:
        rel, d = "/".join(parts), dest
        fresh = False  # below a link or a missing directory: everything is made anew
        for comp in parts[:-1]:
            d = os.path.join(d, comp)
            if d not in dirs:
                # Never looked at through a link or a missing directory above it.
                dirs[d] = "missing" if fresh else _state(d)
                if dirs[d] == "file":
                    raise refuse(d, rel, f"a file where the {kind} has a directory")
            fresh = dirs[d] != "dir"
        target = os.path.join(d, parts[-1])
        if not fresh and _state(target) == "dir":
            raise refuse(target, rel, f"a directory where the {kind} has a file")
    for d in sorted(dirs, key=len):  # parents first
        if dirs[d] == "link":
            os.unlink(d)  # the link, never what it points to
        if dirs[d] != "dir":
            os.mkdir(d)
    for i, parts in enumerate(paths):
        source, target = os.path.join(staging, str(i)), os.path.join(dest, *parts)
        try:
            os.replace(source, target)  # replaces a file or a link; never follows one
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            # A mount point inside dest: copy next to the target, then rename.
            tmp = os.path.join(os.path.dirname(target), f".ckpt-tmp-{os.urandom(16).hex()}")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)


def _state(path: str) -> str:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    return "link" if stat.S_ISLNK(mode) else "dir" if stat.S_ISDIR(mode) else "file"
