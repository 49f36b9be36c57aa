"""Freeze a directory (or one file) in O(files): the first step of every save.

Each regular file is reflink-cloned where the filesystem supports it, else hardlinked
into a private directory on the same filesystem, else copied. Small files are copied
outright while a per-save byte budget lasts: as cheap as a link, and immune to in-place
rewrites. Every file that shares its inode with the source gets a :class:`Fingerprint`
so the uploader can tell whether the user rewrote it in place before it was read.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import shutil
import time
import uuid

from .config import SnapshotMode
from .errors import SnapshotError

__all__ = ["Fingerprint", "Snapshot", "SnapshotFile", "fingerprint_of", "take_snapshot"]

_FICLONE = 0x40049409  # _IOW(0x94, 9, int), from linux/fs.h
_COPY_CHUNK = 1 << 20
_reflink_ok: dict[tuple[int, int], bool] = {}


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What identifies a file's content cheaply: inode, size and modification time."""

    inode: int
    size: int
    mtime_ns: int


def fingerprint_of(st: os.stat_result) -> Fingerprint:
    return Fingerprint(st.st_ino, st.st_size, st.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class SnapshotFile:
    relpath: str  # POSIX separators, relative to the snapshot root
    path: str  # absolute path of the frozen file
    size: int
    fingerprint: Fingerprint
    shared: bool  # True when the inode is shared with the user's file (hardlink)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    root: str
    files: tuple[SnapshotFile, ...]
    seconds: float
    linked: int
    copied: int
    cloned: int

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def release(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _copy(src: str, dst: str, size: int) -> int:
    """Copy ``src`` to a new file ``dst``; return the bytes copied.

    Lean on purpose: it runs once per small file in save(). Reads are sized to the file
    (``os.read`` allocates its whole request up front), and a short read ends the copy
    without another call.
    """
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            want = min(size + 1, _COPY_CHUNK)
            total = 0
            while True:
                buf = os.read(fin, want)
                if buf:
                    os.write(fout, buf)
                    total += len(buf)
                if len(buf) < want:
                    return total
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _try_reflink(src: str, dst: str, key: tuple[int, int]) -> bool:
    if _reflink_ok.get(key) is False:
        return False
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(fout, _FICLONE, fin)
        except OSError:
            os.close(fout)
            os.unlink(dst)
            _reflink_ok[key] = False
            return False
        os.close(fout)
    finally:
        os.close(fin)
    _reflink_ok[key] = True
    return True


def _walk(source: str) -> list[tuple[str, str, os.stat_result]]:
    """(relpath, abspath, stat) of every regular file under ``source``, sorted by relpath."""
    if os.path.isfile(source):
        return [(os.path.basename(source), source, os.stat(source))]
    out: list[tuple[str, str, os.stat_result]] = []
    stack = [("", source)]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for entry in it:
                child_rel = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append((child_rel, entry.path))
                elif entry.is_file(follow_symlinks=True):
                    out.append((child_rel, entry.path, entry.stat(follow_symlinks=True)))
    out.sort(key=lambda t: t[0])
    return out


def take_snapshot(
    source: str,
    dest_root: str,
    *,
    mode: SnapshotMode = SnapshotMode.AUTO,
    copy_budget: int = 0,
) -> Snapshot:
    """Freeze ``source`` (a directory or a file) into a new directory under ``dest_root``.

    ``dest_root`` should be on the same filesystem as ``source`` so links work; where they
    cannot (another device), files are copied. Raises :class:`SnapshotError` when the
    source does not exist or cannot be read.
    """
    t0 = time.perf_counter()
    if not os.path.exists(source):
        raise SnapshotError(
            f"cannot save {source!r}: no such file or directory. Pass save(path=...) an existing "
            "file or directory, or write into current.checkpoint.directory."
        )
    try:
        entries = _walk(source)
    except OSError as e:
        raise SnapshotError(f"cannot read {source!r} to snapshot it: {e}") from e
    os.makedirs(dest_root, exist_ok=True)
    root = os.path.join(dest_root, f"snap-{uuid.uuid4().hex}")
    os.mkdir(root, 0o700)
    root_dev = os.stat(root).st_dev
    made_dirs = {""}
    budget = copy_budget if mode is not SnapshotMode.COPY else None
    linked = copied = cloned = 0
    files: list[SnapshotFile] = []
    try:
        for rel, src, st in entries:
            parent = rel.rpartition("/")[0]
            if parent not in made_dirs:
                os.makedirs(os.path.join(root, parent), exist_ok=True)
                made_dirs.add(parent)
            dst = os.path.join(root, rel)
            shared = False
            size = st.st_size
            if budget is None or size <= budget:
                size = _copy(src, dst, size)
                if budget is not None:
                    budget -= size
                copied += 1
            elif mode in (SnapshotMode.AUTO, SnapshotMode.REFLINK) and _try_reflink(
                src, dst, (st.st_dev, root_dev)
            ):
                cloned += 1
            elif mode is SnapshotMode.REFLINK:
                raise SnapshotError(
                    f"METAFLOW_CHECKPOINT_SNAPSHOT=reflink but the filesystem under {source!r} "
                    "cannot clone files; use auto, link or copy."
                )
            else:
                try:
                    os.link(src, dst)
                    shared = True
                    linked += 1
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    size = _copy(src, dst, size)
                    copied += 1
            # The walk's stat of the user's file is the fingerprint: a link shares that
            # inode, so this is what the uploader must still find when it reads. Should the
            # file change between the walk and the link, the uploader sees a mismatch and
            # drops the checkpoint: the safe direction. Unshared copies are never checked.
            files.append(SnapshotFile(rel, dst, size, fingerprint_of(st), shared))
    except SnapshotError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(root, ignore_errors=True)
        raise SnapshotError(f"cannot snapshot {source!r}: {e}") from e
    return Snapshot(root, tuple(files), time.perf_counter() - t0, linked, copied, cloned)
