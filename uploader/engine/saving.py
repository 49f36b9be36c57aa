"""The save side of an engine: admission, the hand-off of snapshots to the loop, and the
bookkeeping of handles and of what saves point at.

``save()`` blocks only while ``max_pending`` snapshots exist (the admission slots); what
it records here (the handles, the newest save of each name, the incremental bases and
references, the manifests it wrote, the files rewritten in place) is what the upload
pipeline (:mod:`.pipeline`) and the engine's other calls read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import anyio

from ..backends.base import Backend
from ..config import Settings
from ..errors import SnapshotError, UploadError
from ..handle import CheckpointHandle, CheckpointState
from ..incremental import Bases, References
from ..layout import CheckpointKeys
from ..manifest import freeze_metadata
from ..mappings import shared_writable_files
from ..rewrites import RewriteTracker
from ..snapshot import Snapshot, take_snapshot
from ..written import WrittenManifests
from .request import CommitListener, SaveRequest

__all__ = ["REWRITE_ADVICE", "Queue", "Saves"]

REWRITE_ADVICE = (
    "torch.save(), safetensors' save_file() and open(path, 'wb') rewrite the same inode, "
    "which a hardlink snapshot shares. To keep save() O(files), write each checkpoint file "
    "under a new name and os.replace() it over the old one."
)

# Puts one snapshot's upload on the loop: (handle, request, snapshot, rewrite events).
Queue = Callable[[CheckpointHandle, SaveRequest, Snapshot, dict[str, object]], None]

# Longest storage key each backend takes: S3's and GCS's object keys and Azure's blob names
# are at most 1024 bytes; a local path at most PATH_MAX.
_MAX_KEY_BYTES = {"s3": 1024, "gs": 1024, "azure": 1024, "local": 4095}


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a snapshot is taken.

    A snapshot of N files makes a few objects per file, all of which outlive it and none
    of which form cycles, so a collection in the middle finds nothing; but N objects
    trigger N / 700 young collections and some full ones, and a full collection walks
    the task's whole heap (tens of milliseconds in a Metaflow task). Measured in a task
    saving 10,000 small files: 8-110 ms of a save's blocking time was the collector.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class Saves:
    """What one engine (or, after a fork, its fresh copy) knows of its saves.

    ``lock`` is the engine's: it guards the handles, the newest save of each name and the
    own prune markers. The rest is touched only on the loop thread, or is thread-safe.
    """

    def __init__(self, settings: Settings, *, snapshot_dir: str, log: Callable[[str], None],
                 lock: threading.Lock,
                 on_commit: Callable[[CheckpointHandle], None] | None) -> None:
        self.settings = settings
        self._snapshot_dir = snapshot_dir
        self.log = log
        self._on_commit = on_commit
        self.lock = lock
        self.slots = threading.BoundedSemaphore(settings.max_pending)
        self.handles: list[CheckpointHandle] = []
        self.bases = Bases()  # touched only on the loop thread
        self.refs = References()
        self.written = WrittenManifests()  # the manifests this engine committed
        # Held on the loop from a save's check that the objects it points at exist until
        # its manifest is written, and by delete_unreferenced(): see there.
        self._pointing: anyio.Lock | None = None
        # Prune markers of this process's own prunes (uploader.leases): its saves never
        # wait for them, the pointing lock already keeps the two apart.
        self.own_markers: frozenset[str] = frozenset()
        self._told_torn = False
        self._hinted: dict[str, str] = {}
        self._newest: dict[tuple[str, str], CheckpointHandle] = {}  # per (scope, name)
        self.rewrites = RewriteTracker()
        self._told_rewrite = False
        self._warned: set[str] = set()
        # Forgotten on fork, like everything here: a child's engine has no one listening.
        self.commit_listeners: list[CommitListener] = []

    def warn_once(self, topic: str, message: str) -> None:
        """Log ``message`` the first time ``topic`` (a key, a path) comes up."""
        if topic not in self._warned:
            self._warned.add(topic)
            self.log(message)

    # -- admission and hand-off ----------------------------------------------------

    def save(self, request: SaveRequest, *, backend: Backend, queue: Queue,
             synchronous: bool) -> CheckpointHandle:
        """:meth:`uploader.engine.Engine.save`, once the loop runs: ``queue`` puts the
        upload on it."""
        t0, saved_at = time.perf_counter(), time.time()
        # Frozen now: a dict the caller changes after save() returns changes nothing stored,
        # and nothing in it can fail the commit later.
        metadata, replaced = freeze_metadata(request.metadata)
        if replaced:
            self.log(f"WARNING: checkpoint {request.name!r}: {', '.join(replaced[:5])} cannot "
                     "be JSON serialized, so the manifest records '<value cannot be JSON "
                     "serialized>' instead. Convert such values to str, numbers, lists or "
                     "dicts before save().")
        request = dataclasses.replace(request, metadata=metadata)
        self.slots.acquire()
        try:
            with _collector_paused():
                snap = take_snapshot(request.source, self._snapshot_dir,
                                     mode=self.settings.snapshot,
                                     copy_budget=self.settings.copy_budget,
                                     private=self.rewrites.must_freeze,
                                     mapped=shared_writable_files)
        except BaseException:
            self.slots.release()
            raise
        try:
            self._check_keys(backend, request, snap)
        except BaseException:
            snap.release()
            self.slots.release()
            raise
        if snap.skipped:
            self._note_skipped(request, snap)
        key = (request.keys.scope_prefix, request.name)
        handle = CheckpointHandle(request.keys.checkpoint_id, request.name, request.reference,
                                  request.source, scope=key[0])
        handle.stats.saved_at = saved_at
        handle.stats.files, handle.stats.bytes = len(snap.files), snap.total_bytes
        handle.stats.private_bytes = snap.private_bytes
        with self.lock:
            previous = self._newest.get(key)
            self._newest[key] = handle
            self.handles.append(handle)
            handle.number = len(self.handles)
        events = self.rewrites.saved(snap, handle)
        if snap.private:
            self._note_private(snap)
        if snap.mapped:
            self._note_mapped(request, snap)
        # Only the previous newest of this name can be torn and not yet noted: one torn
        # while a newer save of its name existed was noted when it tore.
        if previous is not None and previous.state is CheckpointState.TORN:
            self.note_superseded(previous)
        # Before the upload is queued: a small one may commit, and be reported with this
        # figure, before the line after start_task_soon() would run.
        handle.stats.blocked_s = time.perf_counter() - t0
        try:
            queue(handle, request, snap, events)
        except BaseException as e:
            snap.release()
            self.slots.release()
            handle._transition(CheckpointState.FAILED, UploadError(
                f"checkpoint {request.name!r} could not be queued: {e}",
                checkpoint_id=handle.checkpoint_id))
        if synchronous:
            handle._done.wait()
        return handle

    def _check_keys(self, backend: Backend, request: SaveRequest, snap: Snapshot) -> None:
        # In save(), where the user can rename the file, rather than in a failed upload.
        limit = _MAX_KEY_BYTES.get(backend.kind)
        if limit is None:
            return
        # A file's key is its checkpoint's data prefix and its relative path: the
        # prefix's stored length is found once, not per file (10,000 small files).
        url = backend.url_of(request.keys.data_prefix)
        # The part of the URL that is the store's own key or path.
        stored = (url.split("/", 3)[3] if url.startswith(("s3://", "gs://", "az://"))
                  else url)
        base = len(stored.encode())
        for f in snap.files:
            if base + 4 * len(f.relpath) <= limit:  # UTF-8: at most 4 bytes a character
                continue
            n = base + len(f.relpath.encode())
            if n > limit:
                raise SnapshotError(
                    f"cannot save {request.source!r}: the file {f.relpath!r} would be stored "
                    f"at a key of {n} bytes, more than the {limit} the {backend.kind} "
                    "store takes. Shorten its path (its directories and name).")

    def _note_skipped(self, request: SaveRequest, snap: Snapshot) -> None:
        new = [r for r in snap.skipped if r not in self._warned]
        if not new:
            return
        self._warned.update(new)
        names = ", ".join(repr(r) for r in new[:5]) + (", ..." if len(new) > 5 else "")
        self.log(f"note: checkpoint {request.name!r} leaves out {names} under "
                 f"{request.source}: FIFOs, sockets and device files hold no data a "
                 "checkpoint can store. This note is shown once per path.")

    def _note_private(self, snap: Snapshot) -> None:
        if self._told_rewrite:
            return
        self._told_rewrite = True
        one = len(snap.private) == 1
        names = ", ".join(repr(r) for r in snap.private[:3]) + ("" if len(snap.private) <= 3
                                                                 else ", ...")
        it = "it" if one else "them"
        if snap.private_bytes:
            cost = (f"copies {it} in save() from now on (this save copied "
                    f"{snap.private_bytes / 2**20:.1f} MiB in {snap.private_seconds * 1e3:.0f} ms)")
        else:
            cost = f"clones {it} (reflink) in save() from now on, at no cost"
        self.log(f"note: {names} {'is' if one else 'are'} rewritten in place while an upload "
                 f"of {it} is pending, so @checkpoint {cost}. {REWRITE_ADVICE} "
                 "This note is shown once per task.")

    def _note_mapped(self, request: SaveRequest, snap: Snapshot) -> None:
        new = [r for r in snap.mapped if f"mapped:{r}" not in self._warned]
        if not new:
            return
        self._warned.update(f"mapped:{r}" for r in new)
        names = ", ".join(repr(r) for r in new[:3]) + (", ..." if len(new) > 3 else "")
        self.log(f"note: checkpoint {request.name!r}: {names} under {request.source} "
                 f"{'is' if len(new) == 1 else 'are'} mapped shared and writable by this "
                 "task (mmap, numpy.memmap), so save() copies it rather than linking it: a "
                 "write through the mapping changes no timestamp a check could see. To "
                 "keep save() O(files), flush and close the mapping, or save a copy. "
                 "This note is shown once per file.")

    # -- after an upload -------------------------------------------------------------

    def committed(self, handle: CheckpointHandle) -> None:
        # Before the handle's waiters wake: a task that waited on a save logs its commit
        # line before whatever it does next, and a drain that sees the handle done sees
        # what a listener started (a prune). Neither a report nor a listener that fails
        # ever fails the checkpoint.
        listeners = [] if self._on_commit is None else [self._on_commit]
        for listener in (*listeners, *self.commit_listeners):
            try:
                listener(handle)
            except Exception as e:
                self.warn_once(f"on_commit {type(e).__name__}: {e}",
                               f"WARNING: after committing checkpoint {handle.checkpoint_id}: "
                               f"{type(e).__name__}: {e}")

    def note_superseded(self, torn: CheckpointHandle) -> None:
        # Said once per engine: a torn checkpoint a newer save replaces costs nothing but
        # the upload, and the advice is the same every time.
        if not self._told_torn:
            self._told_torn = True
            self.log(f"note: {torn.error} A newer save supersedes it; this note is shown "
                     "once per task.")

    def has_newer(self, handle: CheckpointHandle) -> bool:
        # No lock: a dict read is atomic, and the loop thread must never wait on a lock
        # that a signal handler's interrupted code may hold.
        return self._newest.get((handle.scope, handle.name)) is not handle

    async def write_latest_hint(self, backend: Backend, keys: CheckpointKeys) -> None:
        # Only a hint for humans and tools; readers list manifests. Never fails a checkpoint.
        # Commits can finish out of order: never point the hint back at an older save.
        hinted = self._hinted.get(keys.scope_prefix, "")
        if keys.checkpoint_id <= hinted:
            return
        self._hinted[keys.scope_prefix] = keys.checkpoint_id
        hint = f'{{"checkpoint_id": "{keys.checkpoint_id}", "manifest": "{keys.manifest}"}}\n'
        try:
            await backend.put_bytes(f"{keys.scope_prefix}/latest.json", hint.encode())
        except Exception as e:
            self.log(f"note: could not update the latest-checkpoint hint: {e}")

    # -- what saves point at ---------------------------------------------------------

    def own_prune_marker(self, key: str, live: bool) -> None:
        """:meth:`uploader.engine.Engine.own_prune_marker`."""
        with self.lock:
            self.own_markers = (self.own_markers | {key} if live
                                else self.own_markers - {key})

    def pointing_lock(self) -> anyio.Lock:
        if self._pointing is None:  # made on the loop, the only place it is used
            self._pointing = anyio.Lock()
        return self._pointing

    async def delete_unreferenced(self, backend: Backend, keys: Sequence[str]
                                  ) -> tuple[list[str], list[tuple[str, str]]]:
        """:meth:`uploader.engine.Engine.delete_unreferenced`, on the loop."""
        async with self.pointing_lock():
            refs = self.refs.all()
            doomed = [k for k in keys if k not in refs]
            failed = await backend.delete_keys(doomed) if doomed else []
        gone = {k for k, _ in failed}
        return [k for k in doomed if k not in gone], failed
