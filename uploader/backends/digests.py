"""What the local store's files hold, by SHA-256, without reading them on every save.

An incremental save points at a file an earlier checkpoint stored instead of storing the
bytes again, and must first know that file still holds them: the same size is not enough
(a same-size corruption would spread to every later checkpoint). Reading it costs a pass
over its bytes; a digest remembered with the file's stat (inode, size, mtime, ctime)
costs one stat. Any write to the file moves its mtime or ctime, so a remembered digest
is never used for changed bytes, except where the store's filesystem keeps coarse
timestamps and the change fell in the granule of the file's last write.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading

__all__ = ["DigestCache"]

_READ = 8 << 20
_StatKey = tuple[int, int, int, int]


def _key(st: os.stat_result) -> _StatKey:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class DigestCache:
    """SHA-256 of stored files, each remembered with its stat; the newest ``limit`` kept.

    Thread-safe: used from worker threads, never while holding anything else.
    """

    def __init__(self, limit: int = 16384) -> None:
        self._limit = limit
        self._known: collections.OrderedDict[str, tuple[_StatKey, str]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def _put(self, path: str, key: _StatKey, digest: str) -> None:
        with self._lock:
            self._known[path] = (key, digest)
            self._known.move_to_end(path)
            while len(self._known) > self._limit:
                self._known.popitem(last=False)

    def remember(self, path: str, digest: str) -> None:
        """``path`` was just written with bytes whose SHA-256 is ``digest``."""
        self._put(path, _key(os.stat(path)), digest)

    def of(self, path: str) -> str:
        """The SHA-256 of what ``path`` holds now: remembered if its stat is unchanged,
        else read (and remembered if it did not change while it was read)."""
        before = _key(os.stat(path))
        with self._lock:
            known = self._known.get(path)
        if known is not None and known[0] == before:
            return known[1]
        digest = hashlib.sha256()
        buf = bytearray(_READ)
        view = memoryview(buf)
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                digest.update(view[:n])
        hexdigest = digest.hexdigest()
        if _key(os.stat(path)) == before:
            self._put(path, before, hexdigest)
        return hexdigest
