"""Whether an S3 object still holds given bytes, by the checksum S3 keeps of it.

An incremental save points at an object an earlier checkpoint stored instead of sending
the bytes again; before it does, it must know the object still holds them. Its size
alone would let a same-size corruption (an overwrite by another tool, an object replaced
by hand) spread to every later checkpoint. S3 keeps the checksum an object was uploaded
with and checked against, and returns it with ``ChecksumMode=ENABLED``:

- a full-object SHA-256 is compared with the SHA-256 the manifest records, directly;
- a CRC32 (what this package's uploads send, per part: see :mod:`..plane.parts`) is compared
  with the one the backend stored there, remembered as it was sent, or else computed
  from a local copy of the bytes: whole, or per part (the first part's size, from a
  ``HeadObject`` of part 1, gives the layout) for a multipart object, whose checksum is
  the CRC32 of its parts' CRC32s ("COMPOSITE");
- an object with neither is not relied on: its bytes are sent again.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.to_thread

from ..plane.parts import checksum_of

__all__ = ["check_stored", "composite_checksum", "stored_crc32"]

_CHUNK = 4 * 1024 * 1024

Head = Callable[..., Awaitable[dict[str, Any] | None]]


def composite_checksum(parts: list[str]) -> str:
    """The ``ChecksumCRC32`` S3 keeps for a multipart object whose parts had these
    (COMPOSITE, its default for CRC32): the CRC32 of the parts' CRC32s, end to end."""
    return checksum_of(b"".join(base64.b64decode(c) for c in parts))


def stored_crc32(local: str | bytes, size: int, part_size: int) -> str:
    """The ``ChecksumCRC32`` S3 keeps for the first ``size`` bytes of ``local`` (a path,
    or the bytes) stored whole (``part_size`` 0) or in parts of ``part_size`` bytes."""
    step = part_size or size
    parts: list[str] = []
    if isinstance(local, bytes):
        view = memoryview(local)
        parts = [checksum_of(view[o:o + step]) for o in range(0, size, step)]
    else:
        with open(local, "rb", buffering=0) as f:
            for offset in range(0, size, step):
                crc, left = 0, min(step, size - offset)
                while left and (chunk := f.read(min(_CHUNK, left))):
                    crc = zlib.crc32(chunk, crc)
                    left -= len(chunk)
                parts.append(base64.b64encode(crc.to_bytes(4, "big")).decode("ascii"))
    if not part_size:
        return parts[0] if parts else checksum_of(b"")
    return composite_checksum(parts)


async def check_stored(head: Head, size: int, sha256: str, local: str | bytes, *,
                       sent: str | None, limiter: anyio.CapacityLimiter
                       ) -> tuple[str | None, str]:
    """``(None, its stored CRC32 or "")`` where the object ``head(**kw)`` looks at holds
    the ``size`` bytes whose SHA-256 is ``sha256`` (those of ``local``), else ``(why not,
    "")``. ``sent``: the CRC32 this backend stored there, if it remembers it."""
    found = await head(ChecksumMode="ENABLED")
    if found is None:
        return "it is gone", ""
    n = int(found["ContentLength"])
    if n != size:
        return f"it holds {n} bytes, not {size}", ""
    multipart = "-" in str(found.get("ETag", "")).strip('"')
    composite = multipart and found.get("ChecksumType") != "FULL_OBJECT"
    sha = str(found.get("ChecksumSHA256") or "")
    if sha and not composite:
        if sha == base64.b64encode(bytes.fromhex(sha256)).decode("ascii"):
            return None, ""
        return "its stored SHA-256 checksum differs from the one its manifest records", ""
    stored = str(found.get("ChecksumCRC32") or "").split("-")[0]
    if not stored:
        return "the store keeps no checksum of it to compare with", ""
    expected = sent
    if expected is None:
        part_size = 0
        if composite:  # the parts' sizes decide the checksum: the first one's says
            part = await head(PartNumber=1)
            part_size = 0 if part is None else int(part["ContentLength"])
        async with limiter:  # reads a local copy: bounded like every other read
            expected = await anyio.to_thread.run_sync(stored_crc32, local, size, part_size)
    if stored != expected:
        return f"its stored CRC32 checksum is {stored}, not the {expected} of its bytes", ""
    return None, stored
