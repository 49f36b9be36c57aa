"""The bytes of an S3 upload: each part read once, hashed where it is read.

A part is read with one ``preadv`` into a buffer sized for it (one copy, kernel to user,
the GIL released), then hashed twice in the same worker-thread call while the bytes are
hot in cache: into the file's running SHA-256 (parts are read in order, so that is the
whole-file digest the manifest records) and into the part's own SHA-256, sent as
``x-amz-checksum-sha256`` so S3 refuses a body corrupted on the way. Both hashes release
the GIL. The file is opened for the read and closed before the call returns, so a file
is open only while its request holds a limiter slot.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import threading
from typing import Any

__all__ = ["InOrderDigest", "PartBody", "checksum_of", "read_part"]

_CHUNK = 4 * 1024 * 1024  # reading back ranges to hash them


class PartBody(io.BytesIO):
    """A part's bytes, filled in place, and their SHA-256 as S3 wants it (base64).

    A BytesIO, so botocore takes it as a streaming body and aiohttp streams it where the
    blocking sender is not used; :attr:`view` is the same memory for one-call sends.
    """

    checksum: str
    size: int

    @property
    def view(self) -> memoryview:
        return self.getbuffer()

    def rewound(self) -> PartBody:
        self.seek(0)  # each attempt sends the body from its start
        return self


def checksum_of(data: bytes | memoryview) -> str:
    """The base64 SHA-256 that S3 takes as ``ChecksumSHA256``."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def read_part(path: str, offset: int, length: int, file_digest: Any) -> PartBody:
    """Read ``length`` bytes of ``path`` at ``offset``; feed them to ``file_digest``.

    Runs in a worker thread. Raises EOFError if the file is shorter than that (it was
    truncated while being uploaded), which the engine reports as a torn file.
    """
    body = PartBody()
    body.size = length
    if length:
        body.seek(length - 1)
        body.write(b"\0")  # sizes the buffer once; the read fills it in place
    fd = os.open(path, os.O_RDONLY)
    try:
        with body.getbuffer() as view:
            got = 0
            while got < length:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    raise EOFError(f"file ended at byte {offset + got}, expected "
                                   f"{offset + length} bytes: was it truncated while being "
                                   "uploaded?")
                got += n
            file_digest.update(view)  # releases the GIL for large buffers
            body.checksum = checksum_of(view)
    finally:
        os.close(fd)
    return body


class InOrderDigest:
    """One SHA-256 over ranges 0, 1, 2, ... that worker threads download in any order.

    The thread that has range ``i`` waits for ``i - 1`` to be fed, then feeds its bytes
    while they are still in its buffer (or reads them back from the file). Ranges are
    requested in order, each holding a limiter slot, so the one waited for is in flight;
    if it fails or is cancelled, :meth:`fail` wakes everyone waiting.
    """

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.fed = 0  # ranges fed so far
        self._failed: str | None = None
        self._cond = threading.Condition()

    def _turn(self, i: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.fed == i or self._failed is not None)
            if self._failed is not None:
                raise EOFError(f"range {i} not hashed: {self._failed}")

    def _advance(self) -> None:
        with self._cond:
            self.fed += 1
            self._cond.notify_all()

    def feed(self, i: int, data: memoryview) -> None:
        self._turn(i)
        self.digest.update(data)  # releases the GIL for large buffers
        self._advance()

    def feed_from(self, i: int, fd: int, offset: int, length: int) -> None:
        """Feed range ``i`` by reading it back from ``fd`` (from the page cache)."""
        self._turn(i)
        try:
            view = memoryview(bytearray(min(length, _CHUNK)))
            end = offset + length
            while offset < end and (n := os.preadv(fd, [view[: end - offset]], offset)):
                self.digest.update(view[:n])
                offset += n
        except BaseException as e:
            self.fail(str(e))
            raise
        self._advance()

    def fail(self, why: str) -> None:
        with self._cond:
            self._failed = self._failed or why
            self._cond.notify_all()
