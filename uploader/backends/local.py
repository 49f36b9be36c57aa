"""The local backend: a directory tree, such as Metaflow's local datastore.

Files are copied in (never hardlinked: a stored checkpoint must not share an inode with
a file the user may rewrite), through a temporary name, fsynced and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import uuid

import anyio
import anyio.to_thread

from ..errors import StorageAccessError
from .base import TransferContext

__all__ = ["LocalBackend"]

_CHUNK = 8 << 20
_TRANSIENT_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT})


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_hashing(src: str, dst: str) -> str:
    """Copy ``src`` to ``dst`` through a temporary name; return the SHA-256 of the bytes."""
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{dst}.tmp-{uuid.uuid4().hex}"
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        with open(src, "rb", buffering=0) as fin, open(tmp, "wb", buffering=0) as fout:
            while True:
                n = fin.readinto(buf)
                if not n:
                    break
                digest.update(view[:n])
                fout.write(view[:n])
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest.hexdigest()


def _write_atomic(dst: str, data: bytes) -> None:
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{dst}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _list(root: str, prefix: str) -> list[str]:
    # Walk from the deepest directory the prefix names, then filter by the full prefix.
    base_rel = prefix.rpartition("/")[0]
    base = os.path.join(root, *base_rel.split("/")) if base_rel else root
    out: list[str] = []
    for dirpath, _dirs, names in os.walk(base):
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for n in names:
            if ".tmp-" in n:
                continue
            key = n if rel_dir == "." else f"{rel_dir}/{n}"
            if key.startswith(prefix):
                out.append(key)
    return out


class LocalBackend:
    kind = "local"

    def __init__(self, root: str, ctx: TransferContext) -> None:
        self.url = os.path.abspath(root)
        self._ctx = ctx

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"unsafe storage key {key!r}")
        return os.path.join(self.url, *parts)

    def url_of(self, key: str) -> str:
        return self._path(key.rstrip("/")) + ("/" if key.endswith("/") else "")

    async def _run(self, fn: object, *args: object, key: str) -> object:
        async with self._ctx.limiter:
            try:
                return await self._ctx.retry.call(
                    lambda: anyio.to_thread.run_sync(fn, *args),  # type: ignore[arg-type]
                    is_transient=_is_transient,
                )
            except PermissionError as e:
                raise StorageAccessError(
                    f"permission denied writing {self._path(key)!r}; check that the datastore "
                    f"root {self.url!r} is writable by this user.", key=key
                ) from e

    async def put_file(self, key: str, path: str, size: int) -> str:
        return str(await self._run(_copy_hashing, path, self._path(key), key=key))

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._run(_write_atomic, self._path(key), data, key=key)

    async def get_bytes(self, key: str) -> bytes | None:
        path = self._path(key)

        def read() -> bytes | None:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None

        result = await self._run(read, key=key)
        return result if isinstance(result, bytes) else None

    async def get_file(self, key: str, dest: str, size: int) -> str:
        return str(await self._run(_copy_hashing, self._path(key), dest, key=key))

    async def list_keys(self, prefix: str) -> list[str]:
        result = await anyio.to_thread.run_sync(_list, self.url, prefix)
        return result

    async def aclose(self) -> None:
        return None
