"""What an engine learns about files its user rewrites in place.

``torch.save()``, safetensors' ``save_file()`` and ``open(path, "wb")`` truncate and
rewrite the inode a hardlink snapshot shares. A path seen doing that (its upload tore, or
it was rewritten while the previous upload of it was still pending) is frozen privately
by every later snapshot for as long as it keeps that inode, so it costs at most one
checkpoint. A path written fresh (a new inode, as ``os.replace()`` gives) is linked again.

It also tells a rewrite from the engine's own doing: every link and unlink of an inode
moves its ctime, and snapshots link and release inodes all the time. Links are recorded
in ``save()``'s thread and releases on the engine's loop thread, so an inode's record
is replaced whole by each event (a new token), never read and incremented: a count two
threads updated at once could lose one of them, and then miss an event.
"""

from __future__ import annotations

import os

from .handle import CheckpointHandle
from .snapshot import Fingerprint, Snapshot, SnapshotFile, fingerprint_of

__all__ = ["RewriteTracker"]


class RewriteTracker:
    """Per-path and per-inode memory of one engine.

    Every map is read and written with single dict operations (atomic), from ``save()``'s
    thread and the loop's. No lock: the loop must never wait on one that a signal
    handler's interrupted code holds.
    """

    def __init__(self) -> None:
        self._rewritten: dict[str, int] = {}  # path -> the inode seen rewritten in place
        self._last_seen: dict[str, tuple[Fingerprint, CheckpointHandle]] = {}
        # inode -> a token replaced by each link and unlink we make of it
        self._link_events: dict[int, object] = {}

    def must_freeze(self, path: str, st: os.stat_result) -> bool:
        """Whether ``path`` (with ``st`` from the walk) must not be hardlinked."""
        if self._rewritten.get(path) == st.st_ino:
            return True
        last = self._last_seen.get(path)
        if last is None:
            return False
        fingerprint, handle = last
        if (fingerprint.inode == st.st_ino and not handle.done()
                and not fingerprint.same_content(fingerprint_of(st), relinked=True)):
            # Rewritten in place while its previous save is still uploading: had that save
            # linked it, it is probably lost, and every later linked save would be too.
            self._rewritten[path] = st.st_ino
            return True
        return False

    def saved(self, snap: Snapshot, handle: CheckpointHandle) -> dict[str, object]:
        """Record a new snapshot; return each linked file's link-event token (per relpath)."""
        events: dict[str, object] = {}
        for f in snap.files:
            self._last_seen[f.source] = (f.fingerprint, handle)
            if f.shared:
                events[f.relpath] = self._event(f)
        return events

    def released(self, snap: Snapshot) -> None:
        """Record the unlinks a snapshot's release is about to make."""
        for f in snap.files:
            if f.shared:
                self._event(f)

    def unchanged(self, f: SnapshotFile, events: dict[str, object]) -> bool:
        """Whether a frozen file still holds what it held when its snapshot was taken.

        A clone, a copy or a read was compared with the walk's fingerprint as it was made
        (:attr:`SnapshotFile.whole`); a linked file shares the user's inode, and is
        compared with its fingerprint now, by the same rule.
        """
        if not f.whole:
            return False
        if not f.shared:
            return True
        relinked = self._link_events.get(f.fingerprint.inode) is not events[f.relpath]
        return f.fingerprint.same_content(fingerprint_of(os.stat(f.path)), relinked=relinked)

    def torn(self, f: SnapshotFile) -> None:
        self._rewritten[f.source] = f.fingerprint.inode

    def _event(self, f: SnapshotFile) -> object:
        # One assignment: whichever thread stores last, no event is lost, and the token
        # a snapshot recorded stays in place only while nothing was linked or unlinked.
        self._link_events[f.fingerprint.inode] = token = object()
        return token
