"""Incremental saves: what an engine knows about the newest checkpoint of each scope.

A job that checkpoints every few minutes writes thousands of checkpoints, and most of
their bytes (a frozen base model, the tokenizer, the config) are the same every time. A
save compares each of its files with the *base* of its scope, the newest committed
checkpoint the engine knows there; a file whose content is the base's is not uploaded
again, and its manifest entry points at the object that already holds those bytes
(:attr:`~uploader.manifest.FileEntry.key`).

"The same" is decided by content, never by name or timestamps: a file with the base's
size is read and its SHA-256 compared with the one the base's manifest recorded. A
fingerprint (inode, size, mtime) would avoid the read, but it only means something for a
file this process linked for the base and watched until it committed; a checkpoint loaded
at task start, a copied small file and a file on a filesystem with coarse timestamps have
none that can be trusted. Reading costs one pass over the bytes in a worker thread
(hashlib releases the GIL for large buffers), far less than sending them.

Bases come from two places: a checkpoint this engine committed (the newest by
:attr:`CheckpointKeys.order <uploader.layout.CheckpointKeys.order>`, not the last to
finish), or one the caller loaded from the same store at task start
(:meth:`Engine.set_base <uploader.engine.Engine.set_base>`), so the first save of a
retry already skips what it resumed from.
"""

from __future__ import annotations

import dataclasses
import hashlib

from .layout import CheckpointKeys
from .manifest import FileEntry, Manifest

__all__ = ["HASH_READ_SIZE", "Base", "Bases", "References", "sha256_file"]

# Large reads: hashlib releases the GIL while it hashes a buffer, so the training loop
# keeps running; 8 MiB keeps the number of reads (and GIL hand-overs) per GiB small.
HASH_READ_SIZE = 8 << 20


def sha256_file(path: str) -> str:
    """The SHA-256 of the file at ``path``, read in :data:`HASH_READ_SIZE` pieces."""
    digest = hashlib.sha256()
    buf = bytearray(HASH_READ_SIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Base:
    """A committed checkpoint that later saves of its scope may point into."""

    keys: CheckpointKeys
    manifest: Manifest
    own: bool  # committed by this engine (else: loaded from the store)
    by_path: dict[str, FileEntry] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_path", {e.path: e for e in self.manifest.files})

    def candidate(self, relpath: str, size: int) -> FileEntry | None:
        """The base's entry for ``relpath`` if it has the same size (else nothing to reuse)."""
        entry = self.by_path.get(relpath)
        return entry if entry is not None and entry.size == size else None

    def origin(self, entry: FileEntry) -> str:
        """Where ``entry``'s bytes are, relative to the scope prefix: the object that was
        uploaded, never an entry that itself points elsewhere (references never chain)."""
        if entry.key is not None:
            return entry.key
        return self.keys.relative(self.keys.data(entry.path))


class Bases:
    """The base of each scope prefix. Only the engine's loop thread uses it."""

    def __init__(self) -> None:
        self._by_scope: dict[str, Base] = {}

    def get(self, scope_prefix: str) -> Base | None:
        return self._by_scope.get(scope_prefix)

    def offer(self, keys: CheckpointKeys, manifest: Manifest, *, own: bool) -> bool:
        """Make this checkpoint its scope's base if it is newer than the current one.

        A checkpoint this engine committed always replaces one it was told about (it was
        saved by this task after that one was loaded); among its own, the newest by
        checkpoint order wins, whatever order the commits finished in. A checkpoint it is
        told about becomes the base only where the engine has committed none there.
        """
        current = self._by_scope.get(keys.scope_prefix)
        if current is not None:
            if current.own and not own:
                return False
            if current.own and own and keys.order <= current.keys.order:
                return False
        self._by_scope[keys.scope_prefix] = Base(keys, manifest, own)
        return True


class References:
    """Keys of stored objects that saves not yet final point at, per checkpoint id.

    Written only by the engine's loop thread, read by any thread (a pruner): each change
    replaces the whole mapping, so a reader sees one consistent version without a lock
    (the loop thread must never wait on a lock another thread may hold).
    """

    def __init__(self) -> None:
        self._refs: dict[str, frozenset[str]] = {}

    def add(self, checkpoint_id: str, key: str) -> None:
        refs = dict(self._refs)
        refs[checkpoint_id] = refs.get(checkpoint_id, frozenset()) | {key}
        self._refs = refs

    def drop(self, checkpoint_id: str) -> None:
        if checkpoint_id in self._refs:
            refs = dict(self._refs)
            del refs[checkpoint_id]
            self._refs = refs

    def all(self) -> set[str]:
        refs = self._refs
        out: set[str] = set()
        for keys in refs.values():
            out |= keys
        return out
