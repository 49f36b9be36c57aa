"""The checksums Google Cloud Storage keeps: CRC32C of every object, base64 of big-endian.

GCS computes an object's CRC32C as it is written and keeps it, composite objects included
(MD5 only for objects uploaded whole). An upload that says which CRC32C its bytes have is
refused by the service when they differ; the backend also compares the one the service
reports back with its own. ``confirm`` compares the stored CRC32C with the one remembered
as it was sent, or else one computed from a local copy of the bytes.
"""

from __future__ import annotations

import base64
import os
from typing import Protocol

import google_crc32c

__all__ = ["Crc32c", "Digest", "crc32c_of", "crc32c_of_file", "encode", "read_chunk"]

_READ = 4 * 1024 * 1024


def encode(value: int) -> str:
    """GCS's spelling of a CRC32C: base64 of its four big-endian bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


class Crc32c:
    """A running CRC32C, fed in order."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        # Holds the GIL, but at several GB/s: a 16 MiB chunk costs a few milliseconds.
        self.value = google_crc32c.extend(self.value, data)

    def b64(self) -> str:
        return encode(self.value)


def crc32c_of(data: bytes) -> str:
    crc = Crc32c()
    crc.update(data)
    return crc.b64()


def crc32c_of_file(path: str, size: int) -> str:
    """The CRC32C GCS keeps for the first ``size`` bytes of the file at ``path``."""
    crc = Crc32c()
    with open(path, "rb", buffering=0) as f:
        left = size
        while left and (chunk := f.read(min(_READ, left))):
            crc.update(chunk)
            left -= len(chunk)
    return crc.b64()


class Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def read_chunk(fd: int, offset: int, length: int, sha: Digest, crc: Crc32c) -> bytes:
    """``length`` bytes of ``fd`` at ``offset`` (one buffer, not copied unless the kernel
    returned it in pieces), fed to the file's running SHA-256 and CRC32C. EOFError where
    the file is shorter than that (it was truncated while it was read)."""
    pieces: list[bytes] = []
    got = 0
    while got < length:
        piece = os.pread(fd, length - got, offset + got)
        if not piece:
            raise EOFError(f"the file was truncated: {length - got} bytes missing at offset "
                           f"{offset + got}")
        pieces.append(piece)
        got += len(piece)
    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
    sha.update(data)  # releases the GIL for large buffers
    crc.update(data)
    return data
