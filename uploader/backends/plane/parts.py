"""The bytes of an S3 upload: each part read once, hashed where it is read.

A part is read with one ``preadv`` into a buffer sized for it, taken from a pool (one
copy, kernel to user, the GIL released), then hashed twice in the same worker-thread call
while the bytes are hot in cache: into the file's running SHA-256 (in part order, so that
is the whole-file digest the manifest records) and into the part's own CRC32, sent as
``x-amz-checksum-crc32`` so S3 refuses a body corrupted on the way (CRC32 runs at more than
twice SHA-256's speed here, and a transfer check needs no more). Both release the GIL.
The file is opened for the read and closed before the call returns, so a file is open
only while its request holds a limiter slot.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import zlib
from collections.abc import Sequence
from typing import Any

__all__ = ["BufferPool", "InOrderDigest", "PartBody", "checksum_of", "digest_of_parts",
           "read_part"]

_CHUNK = 4 * 1024 * 1024  # reading back ranges to hash them


class BufferPool:
    """Part buffers, reused while an upload runs and given back to the system when idle.

    A fresh 16 MiB buffer per part costs its page faults and zeroing on every part; the
    pool hands the same few buffers around instead. It holds at most as many as were in
    use at once (the limiter bounds that) and drops them all when no part is in use, so
    an idle task keeps none.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[bytearray] = []
        self._in_use = 0

    def take(self, size: int) -> bytearray:
        with self._lock:
            self._in_use += 1
            for i, buf in enumerate(self._free):
                if size <= len(buf) <= 2 * size:
                    return self._free.pop(i)
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            self._in_use -= 1
            if self._in_use:
                self._free.append(buf)
            else:
                self._free.clear()


class PartBody:
    """A part's bytes and their CRC32 as S3 wants it (base64).

    File-like enough for botocore (``read``, ``seek``, ``tell``: where no blocking sender is
    in the way, behind a proxy, botocore's own HTTP stack reads it); :attr:`view` is the
    memory itself, for one-call sends. :meth:`release` returns the buffer to its pool.
    """

    def __init__(self, buf: bytearray, size: int, pool: BufferPool | None = None) -> None:
        self._buf, self._pool = buf, pool
        self.size = size
        self.view = memoryview(buf)[:size]
        self.checksum = ""
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self._pos + n)
        data = bytes(self.view[self._pos:end])
        self._pos = end
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, min(self.size, pos + (0, self._pos, self.size)[whence]))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def rewound(self) -> PartBody:
        self._pos = 0  # each attempt sends the body from its start
        return self

    def release(self) -> None:
        if self._pool is not None:
            self.view.release()
            self._pool.give(self._buf)
            self._pool = None


def checksum_of(data: bytes | memoryview) -> str:
    """The base64 big-endian CRC32 that S3 takes as ``ChecksumCRC32``."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode("ascii")


def read_into(path: str, offset: int, view: memoryview) -> None:
    """Fill ``view`` with ``path``'s bytes from ``offset``: one copy, kernel to the buffer.

    Raises EOFError if the file is shorter than that (it was truncated while being
    uploaded), which the engine reports as a torn file.
    """
    length, got = len(view), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while got < length:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise EOFError(f"file ended at byte {offset + got}, expected "
                               f"{offset + length} bytes: was it truncated while being "
                               "uploaded?")
            got += n
    finally:
        os.close(fd)


def read_part(path: str, offset: int, length: int, file_digest: Any,
              pool: BufferPool | None = None) -> PartBody:
    """Read ``length`` bytes of ``path`` at ``offset``; feed them to ``file_digest``.

    Runs in a worker thread. Raises EOFError if the file is shorter than that (it was
    truncated while being uploaded), which the engine reports as a torn file.
    """
    body = PartBody(pool.take(length) if pool else bytearray(length), length, pool)
    try:
        view = body.view
        read_into(path, offset, view)
        file_digest.update(view)  # releases the GIL for large buffers
        body.checksum = checksum_of(view)
    except BaseException:
        body.release()
        raise
    return body


def digest_of_parts(path: str, parts: Sequence[tuple[int, int, str]]) -> str:
    """The SHA-256 of ``path``'s bytes read back part by part, ``parts`` being the
    ``(offset, length, crc32)`` of each part as it was uploaded, in order.

    For a file whose running digest was lost with an upload worker process. Each part's
    bytes must still have the CRC32 they were sent with, so the digest is the digest of
    what was stored; raises EOFError (the file was rewritten: torn) where one does not.
    Runs in a worker thread; reads through one small buffer.
    """
    digest = hashlib.sha256()
    buf = memoryview(bytearray(_CHUNK))
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length, expected in parts:
            crc, pos, end = 0, offset, offset + length
            while pos < end:
                n = os.preadv(fd, [buf[:min(_CHUNK, end - pos)]], pos)
                if n == 0:
                    raise EOFError(f"{path}: file ended at byte {pos}, expected {end} bytes: "
                                   "was it truncated while being uploaded?")
                digest.update(buf[:n])
                crc = zlib.crc32(buf[:n], crc)
                pos += n
            if base64.b64encode(crc.to_bytes(4, "big")).decode("ascii") != expected:
                raise EOFError(f"{path}: bytes {offset}..{end} changed after they were "
                               "uploaded: was the file rewritten while being uploaded?")
    finally:
        os.close(fd)
    return digest.hexdigest()


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
