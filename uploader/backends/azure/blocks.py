"""The bytes of an Azure block blob upload: each block read once, hashed in worker threads.

A block is read with ``preadv`` into a buffer taken from a pool, in a worker thread (the GIL
released), and hashed there while the bytes are hot: its own MD5, sent as the request's
``Content-MD5`` so the service refuses a block corrupted on the way. While it is being sent,
another worker thread feeds it, in block order, to the file's running SHA-256 (what the
manifest records) and MD5 (set as the blob's ``Content-MD5`` when the block list is
committed, so ``confirm`` can compare it later): the file's hashing overlaps the network.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading

from ..plane.parts import BufferPool, read_into

__all__ = ["Block", "FileHashes", "b64md5", "md5_of_file", "read_block", "read_whole"]

_CHUNK = 4 * 1024 * 1024


def b64md5(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class FileHashes:
    """A file's SHA-256 and MD5 over blocks 0, 1, 2, ... that worker threads read in any
    order: the thread with block ``i`` waits until block ``i - 1`` was fed. Blocks are read
    in order, each holding a limiter slot, so the one waited for is being read; if it
    fails, :meth:`fail` wakes everyone waiting."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()
        self.fed = 0
        self._failed: str | None = None
        self._cond = threading.Condition()

    def feed(self, i: int, data: memoryview) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.fed == i or self._failed is not None)
            if self._failed is not None:
                raise EOFError(f"block {i} not hashed: {self._failed}")
        self.sha256.update(data)  # both release the GIL for large buffers
        self.md5.update(data)
        with self._cond:
            self.fed += 1
            self._cond.notify_all()

    def fail(self, why: str) -> None:
        with self._cond:
            self._failed = self._failed or why
            self._cond.notify_all()


class Block:
    """One block's bytes (a view of a pooled buffer) and their MD5."""

    def __init__(self, buf: bytearray, size: int, pool: BufferPool) -> None:
        self._buf, self._pool = buf, pool
        self.view = memoryview(buf)[:size]
        self.md5 = b""

    def release(self) -> None:
        if self._pool is not None:
            self.view.release()
            self._pool.give(self._buf)
            self._pool = None  # type: ignore[assignment]


def read_block(path: str, offset: int, length: int, pool: BufferPool) -> Block:
    """Read ``length`` bytes of ``path`` at ``offset``, with their MD5.

    Runs in a worker thread. Raises EOFError if the file is shorter than that (it was
    truncated while being uploaded), which the engine reports as a torn file. The file's
    own hashes are fed separately (:meth:`FileHashes.feed`), while the block is sent.
    """
    block = Block(pool.take(length), length, pool)
    try:
        read_into(path, offset, block.view)
        block.md5 = hashlib.md5(block.view).digest()
    except BaseException:
        block.release()
        raise
    return block


def read_whole(path: str, size: int, hashes: FileHashes) -> bytes:
    """The ``size`` bytes of a small file, read with one ``pread`` (the SDK's single-shot
    upload takes ``bytes``, not a view), hashed as block 0. Runs in a worker thread."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, size, 0)
            while len(data) < size:
                more = os.pread(fd, size - len(data), len(data))
                if not more:
                    raise EOFError(f"file ended at byte {len(data)}, expected {size} bytes: "
                                   "was it truncated while being uploaded?")
                data += more
        finally:
            os.close(fd)
        hashes.feed(0, memoryview(data))
    except BaseException as e:
        hashes.fail(f"{type(e).__name__}: {e}")
        raise
    return data


def md5_of_file(local: str | bytes, size: int) -> bytes:
    """The MD5 of the first ``size`` bytes of ``local`` (a path, or the bytes)."""
    if isinstance(local, bytes):
        return hashlib.md5(memoryview(local)[:size]).digest()
    digest = hashlib.md5()
    with open(local, "rb", buffering=0) as f:
        left = size
        while left and (chunk := f.read(min(_CHUNK, left))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.digest()
