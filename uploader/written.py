"""The manifests an engine wrote itself, kept to answer its own listings.

A manifest is the commit point and is never changed once written (a checkpoint id is
never reused; a save that mends what it points at writes its own manifest again before
it completes, and the last version is the one kept here). So a listing that finds a
manifest key in the store may take the bytes this engine wrote under it rather than
read them again: a task that saved 1,000 checkpoints lists them with one LIST and no
GET per checkpoint. What exists is still decided by the listing alone: a manifest
deleted from the store (a prune, a person) is not listed whatever is kept here, and
one another process wrote is read from the store.

The bytes are kept, not the parsed manifest: every reader parses its own copy, as it
would after a GET, so nothing a caller does to what it was given changes a later
listing. Bounded in bytes; the least recently written go first.
"""

from __future__ import annotations

import collections
import threading

__all__ = ["WrittenManifests"]

_MAX_BYTES = 64 << 20


class WrittenManifests:
    """Manifest key -> the bytes this engine committed under it (thread-safe)."""

    def __init__(self, max_bytes: int = _MAX_BYTES) -> None:
        self._max = max_bytes
        self._bytes = 0
        self._kept: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            old = self._kept.pop(key, None)
            if old is not None:
                self._bytes -= len(old)
            if len(data) > self._max:
                return
            self._kept[key] = data
            self._bytes += len(data)
            while self._bytes > self._max:
                _, gone = self._kept.popitem(last=False)
                self._bytes -= len(gone)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._kept.get(key)

    def forget(self, keys: list[str]) -> None:
        with self._lock:
            for k in keys:
                old = self._kept.pop(k, None)
                if old is not None:
                    self._bytes -= len(old)
