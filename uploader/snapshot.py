"""Freeze a directory (or one file) in O(files): the first step of every save.

Each regular file is frozen one of four ways (:class:`Freeze`):

- **memory**: small files within a per-save byte budget are read into memory: one open
  and one read, cheaper than a link, and immune to in-place rewrites after ``save()``
  (a counter, a config, a JSON of metrics rewritten every step);
- **clone**: a reflink, where the filesystem has them; private, and as cheap as a link;
- **link**: a hardlink into a private directory on the same filesystem; it shares the
  user's inode, so it gets a :class:`Fingerprint` the uploader checks after reading;
- **copy**: files on another device, files the caller asks to keep private (``private=``:
  the engine names files it has seen rewritten in place), files mapped shared and
  writable (``mapped=``), and every file in copy mode.

Every freeze ends with the same check, the one a linked file gets before its upload
commits: a file whose fingerprint moved from what the walk saw while its bytes were read,
copied or cloned was not frozen whole (:attr:`SnapshotFile.whole` is False), and its
checkpoint is torn rather than committed.

Small files go to memory rather than to a private copy on disk because creating an inode
is what costs: on ext4 a copy cost 2-25x a link per file (it allocates an inode and
data under the journal), while a read of a small file costs less than the link.

What is walked (:class:`_Walk`): regular files, and what symlinks inside the saved
directory point to, stored as regular files; a link that dangles, loops or leaves the
saved directory fails ``save()``; FIFOs, sockets and devices are left out and listed. A
name must be UTF-8 without control characters, so it can be a storage key on any store.

A fingerprint is only as good as the filesystem's timestamps. Where they are coarse (ext4
with 128-byte inodes keeps whole seconds; kernels before 6.13 one clock tick; some network
and FUSE filesystems), a rewrite in the same granule as the fingerprint leaves it
unchanged (:mod:`uploader.timestamps`). There a snapshot waits, before it returns, until
the filesystem's clock has moved past the granule of every file it links, clones or
copies that changed in it, so any change during or after the freeze is seen; where that
wait would cost more than reading the bytes back, it copies the file and compares the
copy with it instead, and a small file read into memory is read twice and kept only if
both reads agree. A file that cannot be proven whole within the bound is torn.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from collections.abc import Set as AbstractSet

from .config import SnapshotMode
from .errors import SnapshotError
from .timestamps import Clock, timestamp_granularity

__all__ = [
    "Fingerprint",
    "Freeze",
    "MappedFiles",
    "PrivatePredicate",
    "Snapshot",
    "SnapshotFile",
    "fingerprint_of",
    "take_snapshot",
    "timestamp_granularity",
]

_FICLONE = 0x40049409  # _IOW(0x94, 9, int), from linux/fs.h
_COPY_CHUNK = 1 << 20
# What reading a file back is assumed to move per second, when choosing between waiting
# out a coarse timestamp and proving a copy by comparing it with the file (a cold page
# cache on a slow disk is slower; the choice sets the cost of save(), never its safety).
_READ_BYTES_PER_S = 1 << 30
_COPY_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                                   errno.EBADF, errno.EPERM})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_reflink_ok: dict[tuple[int, int], bool] = {}

PrivatePredicate = Callable[[str, os.stat_result], bool]
"""``(absolute path, its stat) -> True`` where the file must not share its inode."""

MappedFiles = Callable[[], AbstractSet[int]]
"""``() -> {st_ino}`` of files mapped shared and writable (see :mod:`.mappings`)."""


class Freeze(enum.Enum):
    """How one file was frozen."""

    LINK = "link"  # shares the user's inode: checked by fingerprint
    CLONE = "clone"  # a private reflink
    COPY = "copy"  # a private copy
    MEMORY = "memory"  # the bytes themselves, in ``SnapshotFile.data``


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What identifies a file's content cheaply: inode, size, timestamps, link count.

    ``ctime`` catches writers that restore ``mtime`` afterwards (nothing in user space can
    set it), but every link and unlink of the inode moves it too: snapshots' own links,
    and ``os.replace()`` over the user's name. :meth:`same_content` allows for those.
    """

    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int = 1

    def same_content(self, now: Fingerprint, *, relinked: bool = False) -> bool:
        """Whether a file that had this fingerprint still holds the same bytes.

        A ctime that moved while mtime did not is explained by a change of links (the
        link count differs, or ``relinked`` says the caller linked or unlinked the inode
        meanwhile); otherwise it means the file was rewritten and its mtime restored.
        """
        if (now.inode, now.size, now.mtime_ns) != (self.inode, self.size, self.mtime_ns):
            return False
        return now.ctime_ns == self.ctime_ns or now.nlink != self.nlink or relinked


def fingerprint_of(st: os.stat_result) -> Fingerprint:
    return Fingerprint(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)


@dataclasses.dataclass(frozen=True)
class SnapshotFile:
    relpath: str  # POSIX separators, relative to the snapshot root
    path: str  # absolute path of the frozen file ("" for a file frozen in memory)
    size: int  # of the frozen file itself
    # Of the shared inode after linking (what the uploader must still find); for a clone
    # or a copy, of the user's file as the walk saw it.
    fingerprint: Fingerprint
    how: Freeze = Freeze.LINK
    source: str = ""  # absolute path of the user's file
    data: bytes | None = None  # the content, for a file frozen in memory
    # False where the file changed while it was frozen (or could not be proven not to):
    # the checkpoint holding it is torn. A link is checked again before its upload commits.
    whole: bool = True

    @property
    def shared(self) -> bool:
        """True when the frozen file is the user's inode (a hardlink)."""
        return self.how is Freeze.LINK


@dataclasses.dataclass(frozen=True)
class Snapshot:
    root: str
    files: tuple[SnapshotFile, ...]
    seconds: float
    private: tuple[str, ...] = ()  # relpaths frozen privately because ``private=`` asked
    private_bytes: int = 0
    private_seconds: float = 0.0
    waited_s: float = 0.0  # spent waiting out a coarse timestamp granule
    granularity_ns: int = 0  # of the snapshot filesystem's timestamps
    skipped: tuple[str, ...] = ()  # relpaths of FIFOs, sockets and devices: left out
    mapped: tuple[str, ...] = ()  # relpaths frozen privately because ``mapped=`` named them

    def _count(self, how: Freeze) -> int:
        return sum(1 for f in self.files if f.how is how)

    @property
    def linked(self) -> int:
        return self._count(Freeze.LINK)

    @property
    def cloned(self) -> int:
        return self._count(Freeze.CLONE)

    @property
    def copied(self) -> int:
        return self._count(Freeze.COPY)

    @property
    def in_memory(self) -> int:
        return self._count(Freeze.MEMORY)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def release(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _read_small(src: str, size: int) -> tuple[bytes, os.stat_result]:
    """The content of the small file ``src`` (``size`` as the walk saw it), and the file's
    stat once it was read.

    Lean on purpose: it runs once per small file in save(). The read is sized to the file
    plus one byte (``os.read`` allocates its whole request up front), so a file that did
    not grow is read in one call, and a short read ends it.
    """
    fd = os.open(src, os.O_RDONLY)
    try:
        want = size + 1
        buf = os.read(fd, want)
        if len(buf) < want:
            return buf, os.fstat(fd)
        chunks = [buf]
        while buf := os.read(fd, _COPY_CHUNK):  # it grew since the walk: read the rest
            chunks.append(buf)
        return b"".join(chunks), os.fstat(fd)
    finally:
        os.close(fd)


def _kernel_copy(src: str, dst: str) -> tuple[int, os.stat_result]:
    """Copy ``src`` to a new file ``dst`` inside the kernel; return the copy's size and
    the stat of ``src`` (of the very file read) once it was copied.

    ``copy_file_range`` moves the bytes without bringing them into Python (and lets
    filesystems that can share extents do so); ``sendfile`` is the fallback.
    """
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                while os.copy_file_range(fin, fout, 1 << 30):
                    pass
            except OSError as e:
                if e.errno not in _COPY_FALLBACK_ERRNOS:
                    raise
                os.lseek(fin, 0, os.SEEK_SET)
                os.ftruncate(fout, 0)
                os.lseek(fout, 0, os.SEEK_SET)
                while os.sendfile(fout, fin, None, 1 << 30):
                    pass
            return os.fstat(fout).st_size, os.fstat(fin)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _try_reflink(src: str, dst: str, key: tuple[int, int]
                 ) -> tuple[int, os.stat_result] | None:
    """Clone ``src`` to ``dst``; return the clone's size and the stat of ``src`` once it
    was cloned, or None where cloning fails."""
    if _reflink_ok.get(key) is False:
        return None
    fin = os.open(src, os.O_RDONLY)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.ioctl(fout, _FICLONE, fin)
        except OSError:
            os.close(fout)
            os.unlink(dst)
            _reflink_ok[key] = False
            return None
        # The clone's own size: the file may have changed since the walk saw it.
        size = os.fstat(fout).st_size
        os.close(fout)
        after = os.fstat(fin)
    finally:
        os.close(fin)
    _reflink_ok[key] = True
    return size, after


def _whole(ref: Fingerprint, size: int, after: os.stat_result) -> bool:
    """Whether a file that had the fingerprint ``ref`` (the walk's), of which ``size``
    bytes were frozen and that stats as ``after`` once they were, was frozen whole: the
    rule every freeze ends with.

    The same comparison a linked file gets before its upload commits
    (:meth:`Fingerprint.same_content`): any write meanwhile moves the file's mtime (or its
    size), on a filesystem whose timestamps are fine or whose clock has passed the file's
    last change (:class:`~uploader.timestamps.Clock`).
    """
    return size == ref.size and ref.same_content(fingerprint_of(after))


def _same_bytes(a: str, b: str) -> bool:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            chunk = fa.read(_COPY_CHUNK)
            if chunk != fb.read(_COPY_CHUNK):
                return False
            if not chunk:
                return True


def _read_checked(src: str, st: os.stat_result, fp: Fingerprint, clock: Clock
                  ) -> tuple[bytes, bool]:
    """A small file's bytes, and whether they are the file whole as the walk saw it
    (``st``, whose fingerprint is ``fp``)."""
    data, after = _read_small(src, st.st_size)
    whole = _whole(fp, len(data), after)
    if whole and clock.unsettled(st.st_dev, st.st_mtime_ns):
        # On coarse timestamps a rewrite within the file's last granule shows in no stat.
        # Two reads that agree byte for byte are what the file held at one instant, the
        # one between them: nothing changed under either read.
        again, after = _read_small(src, st.st_size)
        whole = again == data and _whole(fp, len(again), after)
    return data, whole


class _Private:
    """Freezes files privately (a reflink clone, else a kernel copy), each checked.

    Where the file changed in the granule of a coarse clock that is still running, a
    fingerprint cannot prove a freeze whole: before cloning or copying, the snapshot waits
    for the clock to pass the file's mtime, or, where waiting would cost more than
    reading the bytes back, it copies at once and compares the copy with the file.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def _unsettled(self, dev: int, ref: Fingerprint) -> bool:
        return self.clock.unsettled(dev, ref.mtime_ns)

    def _settled(self, dev: int, ref: Fingerprint) -> bool:
        # Once the filesystem's clock has passed the file's mtime, any write during the
        # freeze moves it. False: it could not be proven in time.
        return not self._unsettled(dev, ref) or self.clock.settle(ref.mtime_ns)

    def cheaper_to_wait(self, mtime_ns: int, size: int) -> bool:
        return self.clock.wait_s(mtime_ns) <= 2 * size / _READ_BYTES_PER_S

    def copy(self, src: str, dst: str, dev: int, ref: Fingerprint, *,
             read_back: bool | None = None) -> tuple[int, bool]:
        """``read_back``: prove the copy by comparing it with the file (True), or by
        waiting first where that is needed (False); None chooses the cheaper."""
        if read_back is None:
            read_back = (self._unsettled(dev, ref)
                         and not self.cheaper_to_wait(ref.mtime_ns, ref.size))
        settled = read_back or self._settled(dev, ref)
        size, after = _kernel_copy(src, dst)
        whole = settled and _whole(ref, size, after)
        if whole and read_back:
            # A second read that agrees with the copy: the copy is what the file held at
            # one instant, the one between them (as for a small file read twice).
            whole = _same_bytes(src, dst)
        return size, whole

    def clone(self, src: str, dst: str, st: os.stat_result, key: tuple[int, int]
              ) -> tuple[int, bool] | None:
        if _reflink_ok.get(key) is False:
            return None  # no wait where no clone will be made
        ref = fingerprint_of(st)
        settled = self._settled(st.st_dev, ref)
        cloned = _try_reflink(src, dst, key)
        if cloned is None:
            return None
        size, after = cloned
        return size, settled and _whole(ref, size, after)

    def clone_or_copy(self, src: str, dst: str, st: os.stat_result, key: tuple[int, int]
                      ) -> tuple[Freeze, int, bool]:
        cloned = self.clone(src, dst, st, key)
        if cloned is not None:
            return Freeze.CLONE, *cloned
        return Freeze.COPY, *self.copy(src, dst, st.st_dev, fingerprint_of(st))


class _Walk:
    """Every regular file under a source, by the rule for links and special files.

    Symlinks are followed, to files and to directories alike, and stored as what they
    point to: a checkpoint holds regular files only. A link must point inside the saved
    directory, so a checkpoint never picks up files from elsewhere (a link to ``/etc``,
    a home directory or a dataset); a link that dangles, escapes, or leads back into a
    directory containing it is a :class:`SnapshotError` naming the link. FIFOs, sockets
    and devices hold no data to store: they are left out and listed in ``skipped``.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.real_root = os.path.realpath(source)
        self.files: list[tuple[str, str, os.stat_result]] = []  # relpath, path, stat
        self.skipped: list[str] = []

    def run(self) -> None:
        st = os.stat(self.source)
        if not stat.S_ISDIR(st.st_mode):
            # A file the caller named is taken wherever a link to it points.
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(
                    f"cannot save {self.source!r}: it is not a regular file or a directory.")
            self._add(os.path.basename(self.source), self.real_root, st)
            return
        stack = [("", self.source, frozenset({(st.st_dev, st.st_ino)}))]
        while stack:
            rel, path, ancestors = stack.pop()
            with os.scandir(path) as it:
                for entry in it:
                    child = f"{rel}/{entry.name}" if rel else entry.name
                    if entry.is_symlink():
                        self._link(child, entry.path, ancestors, stack)
                    elif entry.is_dir(follow_symlinks=False):
                        dst = entry.stat(follow_symlinks=False)
                        stack.append((child, entry.path,
                                      ancestors | {(dst.st_dev, dst.st_ino)}))
                    elif entry.is_file(follow_symlinks=False):
                        self._add(child, entry.path, entry.stat(follow_symlinks=False))
                    else:
                        self.skipped.append(child)
        self.files.sort(key=lambda t: t[0])
        self.skipped.sort()

    def _link(self, rel: str, path: str, ancestors: frozenset[tuple[int, int]],
              stack: list[tuple[str, str, frozenset[tuple[int, int]]]]) -> None:
        target = os.path.realpath(path)
        where = f"cannot save {self.source!r}: the symlink {rel!r} points to {target!r}"
        try:
            st = os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SnapshotError(f"{where}, a chain of links that never ends. Remove the "
                                    "link or point it at a file.") from e
            raise SnapshotError(f"{where}, which does not exist. Remove the link, or create "
                                "its target before save().") from e
        if os.path.commonpath([self.real_root, target]) != self.real_root:
            raise SnapshotError(
                f"{where}, outside the saved directory. A checkpoint stores what a link points "
                "to only inside the saved directory, so it never picks up files from "
                "elsewhere: copy the file in, or save the target itself with "
                "save(path=...).")
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in ancestors:
                raise SnapshotError(f"{where}, a directory that contains the link itself, so "
                                    "following it would never end. Remove the link.")
            stack.append((rel, path, ancestors | {(st.st_dev, st.st_ino)}))
        elif stat.S_ISREG(st.st_mode):
            # Read through the real path: it is the file the user's writes change.
            self._add(rel, target, st)
        else:
            self.skipped.append(rel)

    def _add(self, rel: str, path: str, st: os.stat_result) -> None:
        # Names become storage keys: checked here, so any name save() takes, load() gives
        # back, on every store.
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise SnapshotError(
                f"cannot save {self.source!r}: the name {rel!r} is not valid UTF-8, which "
                "storage keys must be. Rename the file.") from None
        if _CONTROL.search(rel):
            raise SnapshotError(
                f"cannot save {self.source!r}: the name {rel!r} contains a control character, "
                "which storage keys cannot carry safely (S3 listings cannot hold most of them, "
                "and some S3-compatible servers refuse a newline). Rename the file.")
        self.files.append((rel, path, st))


class _Found(list[tuple[str, str, os.stat_result]]):
    """(relpath, path, stat) of every file to save; ``skipped``: what was left out."""

    skipped: tuple[str, ...] = ()


def _walk(source: str) -> _Found:
    walk = _Walk(source)
    walk.run()
    found = _Found(walk.files)
    found.skipped = tuple(walk.skipped)
    return found


def _settle_links(files: list[SnapshotFile], freeze: _Private) -> None:
    """Make every linked file's fingerprint sound on this filesystem's timestamps.

    The link set the inode's ctime to the filesystem's "now". A file whose mtime is still
    in that granule could be rewritten within it, leaving mtime as it is: wait for the
    filesystem's clock to pass it and take the fingerprint again, or, where waiting would
    cost more than copying and reading back the linked bytes, copy them instead. A file
    that changed meanwhile, or that could not be waited out within the bound, was not
    frozen whole: its entry (replaced in ``files``) says so, and its checkpoint is torn.
    """
    clock = freeze.clock
    unsettled = [i for i, f in enumerate(files) if f.how is Freeze.LINK and clock.unsettled(
        clock.dev, f.fingerprint.mtime_ns, since=f.fingerprint.ctime_ns)]
    if not unsettled:
        return
    newest = max(files[i].fingerprint.mtime_ns for i in unsettled)
    if freeze.cheaper_to_wait(newest, sum(files[i].size for i in unsettled)):
        settled = clock.settle(newest)
        for i in unsettled:
            f = files[i]
            now = fingerprint_of(os.stat(f.path))
            whole = settled and f.fingerprint.same_content(now)
            files[i] = dataclasses.replace(f, fingerprint=now if whole else f.fingerprint,
                                           whole=whole)
        return
    for i in unsettled:
        f = files[i]
        os.unlink(f.path)
        size, whole = freeze.copy(f.source, f.path, clock.dev, f.fingerprint, read_back=True)
        files[i] = dataclasses.replace(f, how=Freeze.COPY, size=size, whole=whole)


def take_snapshot(
    source: str,
    dest_root: str,
    *,
    mode: SnapshotMode = SnapshotMode.AUTO,
    copy_budget: int = 0,
    private: PrivatePredicate | None = None,
    mapped: MappedFiles | None = None,
) -> Snapshot:
    """Freeze ``source`` (a directory or a file) into a new directory under ``dest_root``.

    ``dest_root`` should be on the same filesystem as ``source`` so links work; where they
    cannot (another device), files are copied. ``private(path, stat)`` returning True
    keeps that file from sharing its inode: it is cloned, else copied by the kernel.
    ``mapped()``, called at most once and only if a file is about to be linked, gives
    the inode numbers of files mapped shared and writable: those are never linked.
    Raises :class:`SnapshotError` when the source does not exist or cannot be read.
    """
    t0 = time.perf_counter()
    if not os.path.exists(source):
        raise SnapshotError(
            f"cannot save {source!r}: no such file or directory. Pass save(path=...) an existing "
            "file or directory, or write into current.checkpoint.directory."
        )
    try:
        os.makedirs(dest_root, exist_ok=True)
        clock = Clock(dest_root)  # before the walk: see Clock
    except OSError as e:
        raise SnapshotError(f"cannot snapshot {source!r} into {dest_root!r}: {e}") from e
    try:
        entries = _walk(source)
    except OSError as e:
        raise SnapshotError(f"cannot read {source!r} to snapshot it: {e}") from e
    root = os.path.join(dest_root, f"snap-{uuid.uuid4().hex}")
    os.mkdir(root, 0o700)
    root_dev = os.stat(root).st_dev
    made_dirs = {""}
    budget = copy_budget if mode is not SnapshotMode.COPY else None
    files: list[SnapshotFile] = []
    privates: list[str] = []
    mapped_rels: list[str] = []
    shared: AbstractSet[int] | None = None
    private_bytes = 0
    private_s = 0.0
    freeze = _Private(clock)
    try:
        for rel, src, st in entries:
            fp = fingerprint_of(st)
            if budget is not None and st.st_size <= budget:
                data, whole = _read_checked(src, st, fp, clock)
                budget -= len(data)
                files.append(SnapshotFile(rel, "", len(data), fp, Freeze.MEMORY, src, data,
                                          whole=whole))
                continue
            key = (st.st_dev, root_dev)
            parent = rel.rpartition("/")[0]
            if parent not in made_dirs:
                os.makedirs(os.path.join(root, parent), exist_ok=True)
                made_dirs.add(parent)
            dst = os.path.join(root, rel)
            how = Freeze.COPY
            if budget is None:
                size, whole = freeze.copy(src, dst, st.st_dev, fp)
            elif private is not None and private(src, st):
                t1 = time.perf_counter()
                how, size, whole = freeze.clone_or_copy(src, dst, st, key)
                private_s += time.perf_counter() - t1
                private_bytes += size if how is Freeze.COPY else 0
                privates.append(rel)
            elif mode in (SnapshotMode.AUTO, SnapshotMode.REFLINK) and (
                cloned := freeze.clone(src, dst, st, key)
            ) is not None:
                how, (size, whole) = Freeze.CLONE, cloned
            elif mode is SnapshotMode.REFLINK:
                raise SnapshotError(
                    f"METAFLOW_CHECKPOINT_SNAPSHOT=reflink but the filesystem under {source!r} "
                    "cannot clone files; use auto, link or copy."
                )
            elif mapped is not None and st.st_ino in (
                    shared := mapped() if shared is None else shared):
                # Written through a shared mapping: writes to pages already dirty move
                # neither mtime nor ctime, so no fingerprint can tell a link was changed.
                how, size, whole = freeze.clone_or_copy(src, dst, st, key)
                private_bytes += size if how is Freeze.COPY else 0
                mapped_rels.append(rel)
            else:
                if not os.access(src, os.R_OK):
                    # A link needs no read permission, but the upload will.
                    raise PermissionError(errno.EACCES, "Permission denied", src)
                try:
                    os.link(src, dst)
                    how, whole = Freeze.LINK, True
                    # After the link: linking changes the inode's ctime, and the uploader
                    # must find exactly this. A rewrite between the walk and the link is
                    # in the linked inode, and so in this fingerprint; the upload's check
                    # sees any later one.
                    lst = os.stat(dst)
                    fp, size = fingerprint_of(lst), lst.st_size
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
                    size, whole = freeze.copy(src, dst, st.st_dev, fingerprint_of(st))
            files.append(SnapshotFile(rel, dst, size, fp, how, src, whole=whole))
        _settle_links(files, freeze)
    except SnapshotError:
        shutil.rmtree(root, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(root, ignore_errors=True)
        if e.filename is not None and not str(e.filename).startswith(root):
            # The user's side: name the file and what to do about it.
            raise SnapshotError(
                f"cannot save {source!r}: cannot read {e.filename!r} ({e.strerror}). Make it "
                "readable by this user (chmod u+r), or move it out of the saved directory."
            ) from e
        raise SnapshotError(f"cannot snapshot {source!r}: {e}") from e
    return Snapshot(root, tuple(files), time.perf_counter() - t0, tuple(privates),
                    private_bytes, private_s, clock.waited_s, clock.granularity,
                    getattr(entries, "skipped", ()), tuple(mapped_rels))
