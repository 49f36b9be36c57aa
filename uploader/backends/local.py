"""The local backend: a directory tree, such as Metaflow's local datastore.

Files are copied in (never hardlinked: a stored checkpoint must not share an inode with
a file the user may rewrite), through a temporary name, fsynced and renamed into place.

Durable when a write returns: the file's bytes, its name in its directory, and the name of
every directory above it up to the root. A directory is fsynced after each entry made in
it, but concurrent writers share one fsync (:class:`_DirSync`), so a checkpoint of many
files in one directory costs few directory fsyncs. A file is opened only while its
request holds a slot of the shared limiter.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, TypeVar

import anyio
import anyio.to_thread

from ..errors import CheckpointError, LoadError, SourceReadError, StorageAccessError, UploadError
from .base import StoredObject, TransferContext, Upload, stored
from .digests import DigestCache

__all__ = ["LocalBackend"]

T = TypeVar("T")

_CHUNK = 8 << 20
_TRANSIENT_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT})
# Temporary names are short and fixed-length, so a stored name may use all of NAME_MAX.
TEMP_PREFIX = ".ckpt-tmp-"
_TMP_NAME = re.compile(r"\.ckpt-tmp-[0-9a-f]{32}|.*\.tmp-[0-9a-f]{32}")  # ours, older ones

Side = Literal["read", "write"]


class _SideError(Exception):
    """An OSError on one side of a copy: reading the source or writing the destination."""

    def __init__(self, side: Side, error: OSError) -> None:
        super().__init__(str(error))
        self.side = side
        self.error = error


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _SideError):
        exc = exc.error
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(directory: str) -> str:
    return os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}")


@contextlib.contextmanager
def _side(side: Side) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _SideError(side, e) from e


def _copy_hashing(src: str, dst: str, *, durable: bool) -> str:
    """Copy ``src`` to ``dst`` through a temporary name; return the SHA-256 of the bytes.

    ``dst``'s directory must exist. Errors come as :class:`_SideError`, telling a source
    that cannot be read from a destination that cannot be written.
    """
    tmp = _tmp_path(os.path.dirname(dst))
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        with _side("read"):
            fin = open(src, "rb", buffering=0)  # noqa: SIM115  closed below
        with fin:
            with _side("write"):
                fout = open(tmp, "xb", buffering=0)  # noqa: SIM115
            with fout:
                while True:
                    with _side("read"):
                        n = fin.readinto(buf)
                    if not n:
                        break
                    digest.update(view[:n])
                    with _side("write"):
                        fout.write(view[:n])
                if durable:
                    with _side("write"):
                        os.fsync(fout.fileno())
        with _side("write"):
            os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest.hexdigest()


def _write_atomic(dst: str, data: bytes) -> None:
    tmp = _tmp_path(os.path.dirname(dst))
    try:
        with _side("write"), open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with _side("write"):
            os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# Writes into a directory that other processes' prunes keep emptying and removing.
_WRITE_TRIES = 20


def _makedirs(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``; return the directories it made, top first."""
    made: list[str] = []
    missing: list[str] = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
            made.append(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
    return made


def _walk(root: str, prefix: str) -> Iterator[tuple[str, str, str]]:
    """``(key, directory, name)`` of every file whose key starts with ``prefix``,
    temporary files included."""
    # Walk from the deepest directory the prefix names, then filter by the full prefix.
    base_rel = prefix.rpartition("/")[0]
    base = os.path.join(root, *base_rel.split("/")) if base_rel else root
    for dirpath, _dirs, names in os.walk(base):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for n in names:
            key = n if rel_dir == "." else f"{rel_dir}/{n}"
            if key.startswith(prefix):
                yield key, dirpath, n


def _list(root: str, prefix: str) -> list[str]:
    return [key for key, _, n in _walk(root, prefix) if not _TMP_NAME.fullmatch(n)]


def _list_objects(root: str, prefix: str) -> list[StoredObject]:
    # Like _list, but with sizes and times, and with the temporary files of writers that
    # were killed: they are part of what a crashed upload left behind.
    out: list[StoredObject] = []
    for key, dirpath, n in _walk(root, prefix):
        try:
            st = os.lstat(os.path.join(dirpath, n))
        except FileNotFoundError:
            continue  # deleted while we walked
        out.append(StoredObject(key, st.st_size, st.st_mtime))
    return out


def _delete(root: str, paths: dict[str, str]) -> tuple[list[tuple[str, str]], set[str]]:
    """Unlink each path (``key -> path``); then make the removals durable and remove the
    directories they left empty. Returns the failures and the directories removed."""
    failed: list[tuple[str, str]] = []
    touched: set[str] = set()
    for key, path in paths.items():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            failed.append((key, f"cannot delete {path!r}: {e}"))
            continue
        touched.add(os.path.dirname(path))
    # Durable before the caller goes on: a manifest deleted, then its data, must never
    # come back after a power cut as a manifest whose data is gone.
    for d in touched:
        with contextlib.suppress(FileNotFoundError):
            _fsync_dir(d)
    removed: set[str] = set()
    for d in sorted(touched, key=len, reverse=True):
        while d != root and d.startswith(root + os.sep) and d not in removed:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                break  # not empty (or not ours to remove): stop going up
            removed.add(d)
            d = os.path.dirname(d)
    return failed, removed


class _DirSync:
    """Makes directory entries durable, sharing one fsync among concurrent writers.

    Each entry made in a directory (a rename into it, a new subdirectory) gets a number
    from :meth:`changed`; :meth:`sync` returns once an fsync of that directory that
    started after that number was given has finished: its own, or a concurrent one's.
    A directory made before this process looked (by an earlier process that may have
    died before syncing its parent) is synced into its parent once.
    """

    def __init__(self, root: str) -> None:
        self._root = root
        self._changes: dict[str, int] = {}
        self._synced: dict[str, int] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._durable: set[str] = {root}

    def changed(self, directory: str) -> int:
        self._changes[directory] = n = self._changes.get(directory, 0) + 1
        return n

    async def sync(self, directory: str, change: int) -> None:
        lock = self._locks.setdefault(directory, anyio.Lock())
        async with lock:
            if self._synced.get(directory, 0) >= change:
                return
            upto = self._changes[directory]
            try:
                await anyio.to_thread.run_sync(_fsync_dir, directory)
            except FileNotFoundError:
                # Another process removed it, once what was in it was deleted: no name in
                # it is left to make durable.
                self._durable.discard(directory)
                return
            self._synced[directory] = upto

    def forget(self, directories: set[str]) -> None:
        """``directories`` were removed: a directory made again there must be synced anew."""
        self._durable -= directories

    async def ancestors(self, directory: str) -> None:
        """Make the names of ``directory`` and every directory above it (to the root) durable."""
        chain: list[str] = []
        d = directory
        while d not in self._durable and d.startswith(self._root + os.sep):
            chain.append(d)
            d = os.path.dirname(d)
        for d in reversed(chain):  # top first: a name is only as durable as its parent's
            parent = os.path.dirname(d)
            await self.sync(parent, self.changed(parent))
            self._durable.add(d)


class LocalBackend:
    kind = "local"

    def __init__(self, root: str, ctx: TransferContext) -> None:
        self.url = os.path.abspath(root)
        self._ctx = ctx
        self._dirs = _DirSync(self.url)
        self._digests = DigestCache()

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if any(p in ("", ".", "..") or "\0" in p for p in parts):
            raise ValueError(f"unsafe storage key {key!r}")
        return os.path.join(self.url, *parts)

    def url_of(self, key: str) -> str:
        return self._path(key.rstrip("/")) + ("/" if key.endswith("/") else "")

    async def _thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread, retried on transient errors. Hold a slot around it."""
        return await self._ctx.retry.call(lambda: anyio.to_thread.run_sync(fn),
                                          is_transient=_is_transient)

    def _store_error(self, e: _SideError | OSError, key: str, doing: str) -> CheckpointError:
        err = e.error if isinstance(e, _SideError) else e
        if isinstance(err, PermissionError):
            return StorageAccessError(
                f"permission denied {doing} {self._path(key)!r}; check that the datastore "
                f"root {self.url!r} is writable by this user.", key=key)
        return UploadError(f"{doing} {self._path(key)!r} failed: {err}. Check that the "
                           f"datastore root {self.url!r} has space and is writable.", key=key)

    async def _store(self, key: str, write: Callable[[str], T], doing: str) -> T:
        """Write ``key`` durably with ``write(path)``: its directories, the file, the names."""
        path = self._path(key)
        parent = os.path.dirname(path)
        def run() -> tuple[list[str], T]:
            made: list[str] = []
            for tries in range(_WRITE_TRIES):
                try:
                    with _side("write"):
                        made += _makedirs(parent)
                    return made, write(path)
                except _SideError as e:
                    # A prune (of any process) removed a directory it emptied between our
                    # makedirs and our write: make it again.
                    if e.side != "write" or not isinstance(e.error, FileNotFoundError) \
                            or tries == _WRITE_TRIES - 1:
                        raise
            raise AssertionError("unreachable")

        try:
            async with self._ctx.limiter:
                made, result = await self._thread(run)
                # The new directories' names, then the file's name, in their parents.
                # Made again where another process removed them: their names are new.
                self._dirs.forget(set(made))
                for d in made:
                    self._dirs.changed(os.path.dirname(d))
                await self._dirs.ancestors(parent)
                await self._dirs.sync(parent, self._dirs.changed(parent))
        except _SideError as e:
            if e.side == "read":
                raise SourceReadError(
                    f"cannot read the file being saved ({e.error}). Check that it stays "
                    "readable, and that nothing removes it or changes its permissions while "
                    "its upload is pending.", key=key) from e.error
            raise self._store_error(e, key, doing) from e.error
        except OSError as e:
            raise self._store_error(e, key, doing) from e
        return result

    def _remembered(self, dst: str, digest: str) -> str:
        # Where an incremental save will look before pointing at it: see confirm().
        with contextlib.suppress(OSError):
            self._digests.remember(dst, digest)
        return digest

    async def put_file(self, key: str, path: str, size: int) -> str:
        digest = await self._store(key, lambda dst: self._remembered(
            dst, _copy_hashing(path, dst, durable=True)), "writing")
        stored(size)  # a copy is durable as a whole: counted once, on this loop
        return digest

    async def put_bytes(self, key: str, data: bytes) -> None:
        def write(dst: str) -> None:
            _write_atomic(dst, data)
            self._remembered(dst, hashlib.sha256(data).hexdigest())

        await self._store(key, write, "writing")

    async def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)

        def read() -> bytes | None:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None

        try:
            async with self._ctx.limiter:
                return await self._thread(read)
        except OSError as e:
            raise LoadError(f"cannot read {path!r}: {e}") from e

    async def get_file(self, key: str, dest: str, size: int) -> str:
        """Copy ``key`` to ``dest``, whose directory must exist; not fsynced (a copy out)."""
        src = self._path(key)

        def copy() -> str:
            with _side("write"):
                os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            return _copy_hashing(src, dest, durable=False)

        try:
            async with self._ctx.limiter:
                return await self._thread(copy)
        except _SideError as e:
            if e.side == "write":
                raise LoadError(f"cannot write {dest!r} ({e.error}); check that the "
                                "destination is writable and has space.") from e.error
            if isinstance(e.error, FileNotFoundError):
                raise LoadError(f"the stored file {src!r} is missing: the checkpoint is "
                                "incomplete in the store.") from e.error
            raise LoadError(f"cannot read the stored file {src!r}: {e.error}") from e.error

    async def stat(self, key: str) -> int | None:
        path = self._path(key)

        def size() -> int | None:
            try:
                return os.stat(path).st_size
            except FileNotFoundError:
                return None

        try:
            async with self._ctx.limiter:
                return await self._thread(size)
        except OSError as e:
            raise LoadError(f"cannot look at {path!r}: {e}") from e

    async def confirm(self, key: str, size: int, sha256: str, local: str | bytes
                      ) -> str | None:
        # By the file's own SHA-256, remembered while its stat is unchanged: one read per
        # stored file at most, none for a file this backend wrote.
        n = await self.stat(key)
        if n is None:
            return "it is gone"
        if n != size:
            return f"it holds {n} bytes, not {size}"
        path = self._path(key)
        try:
            async with self._ctx.limiter:
                digest = await self._thread(lambda: self._digests.of(path))
        except FileNotFoundError:
            return "it is gone"
        except OSError as e:
            raise LoadError(f"cannot read {path!r}: {e}") from e
        if digest != sha256:
            return f"its bytes have SHA-256 {digest}, not the {sha256} they were stored with"
        return None

    async def list_keys(self, prefix: str) -> list[str]:
        result = await anyio.to_thread.run_sync(_list, self.url, prefix)
        return result

    async def list_objects(self, prefix: str) -> list[StoredObject]:
        try:
            return await anyio.to_thread.run_sync(_list_objects, self.url, prefix)
        except OSError as e:
            raise CheckpointError(f"listing {self.url_of(prefix)!r} failed: {e}") from e

    async def delete_keys(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        paths = {k: self._path(k) for k in keys}
        if not paths:
            return []
        async with self._ctx.limiter:
            failed, removed = await self._thread(lambda: _delete(self.url, paths))
        self._dirs.forget(removed)
        return failed

    async def list_uploads(self, prefix: str) -> list[Upload]:
        return []  # files are written whole, through a temporary name: nothing is partial

    async def abort_upload(self, key: str, upload_id: str) -> None:
        return None

    async def aclose(self) -> None:
        return None
