"""What the engine needs from a store, and the shared context backends run in."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import NamedTuple, Protocol

import anyio

from ..config import Settings
from ..retry import RetryPolicy

__all__ = ["Backend", "StoredObject", "TransferContext", "Upload", "reporting_progress",
           "stored"]

# Who counts the bytes of the file being uploaded as the store takes them (set by the
# engine around one file's put_file; tasks and threads started inside inherit it).
_progress: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar(
    "upload_progress", default=None)


@contextlib.contextmanager
def reporting_progress(count: Callable[[int], None]) -> Iterator[None]:
    """Within this block, :func:`stored` calls ``count``."""
    token = _progress.set(count)
    try:
        yield
    finally:
        _progress.reset(token)


def stored(n: int) -> None:
    """A backend stored ``n`` more bytes of the file it is uploading (a part, a block, a
    chunk): the drain's progress moves with them, not only once a whole file is done."""
    count = _progress.get()
    if count is not None:
        count(n)


class StoredObject(NamedTuple):
    """One object of a listing with what retention needs: how big, how old."""

    key: str
    size: int
    mtime: float  # seconds since the epoch, by the store's clock


class Upload(NamedTuple):
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: float  # seconds since the epoch, by the store's clock


@dataclasses.dataclass(frozen=True)
class TransferContext:
    """Created inside the engine's event loop and shared by every transfer in it."""

    settings: Settings
    limiter: anyio.CapacityLimiter  # one slot per request in flight, across all files
    retry: RetryPolicy
    # Where a backend says what the user should know of (a replaced upload worker, say):
    # the engine's log, so the task's log.
    log: Callable[[str], None] = print

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One :attr:`limiter` slot, for one request. A fresh borrower each time: one task
        may hold several slots (one per part, block or range)."""
        token = object()
        await self.limiter.acquire_on_behalf_of(token)
        try:
            yield
        finally:
            self.limiter.release_on_behalf_of(token)


class Backend(Protocol):
    """A store of keys under one root. All methods run on the engine's event loop.

    Backends retry their own requests with ``TransferContext.retry`` and take one
    ``TransferContext.limiter`` slot per request in flight.
    """

    kind: str  # "local" or "s3"
    url: str  # the root, as a user would write it

    def url_of(self, key: str) -> str: ...

    async def put_file(self, key: str, path: str, size: int) -> str:
        """Store the file at ``path`` under ``key``; return the SHA-256 of the bytes read."""
        ...

    async def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically and durably."""
        ...

    async def get_bytes(self, key: str) -> bytes | None:
        """The bytes under ``key``, or None where there is no such key."""
        ...

    async def get_file(self, key: str, dest: str, size: int) -> str:
        """Write the object under ``key`` to ``dest``; return the SHA-256 of the bytes written."""
        ...

    async def stat(self, key: str) -> int | None:
        """The size of the object under ``key``, or None where there is none."""
        ...

    async def confirm(self, key: str, size: int, sha256: str, local: str | bytes
                      ) -> str | None:
        """Whether the object under ``key`` holds the ``size`` bytes whose SHA-256 is
        ``sha256``, by the checksum or digest the store keeps of it, never by size alone.

        None where it does; otherwise why it cannot be relied on, said for a log line
        ("it is gone", "its stored checksum differs"). ``local`` (a file's path, or the
        bytes themselves) holds those bytes, for a store whose checksum is of another
        kind and must be computed from them.
        """
        ...

    async def list_keys(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix``, in no particular order."""
        ...

    async def list_objects(self, prefix: str) -> list[StoredObject]:
        """Every object under ``prefix`` with its size and modification time, in no
        particular order; on a local store, files a killed writer left half-written too."""
        ...

    async def delete_keys(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        """Delete ``keys`` (a key already gone counts as deleted), durably; return
        ``(key, reason)`` for each one that could not be deleted. Raises only when the
        store refuses the request as a whole."""
        ...

    async def list_uploads(self, prefix: str) -> list[Upload]:
        """Multipart uploads under ``prefix`` that are neither completed nor aborted."""
        ...

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort one multipart upload; one already gone counts as aborted."""
        ...

    async def aclose(self) -> None: ...
