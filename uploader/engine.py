"""The engine: snapshot in the caller's thread, upload on one background event loop.

One :class:`Engine` owns one thread running one asyncio loop (through an anyio blocking
portal). ``save()`` snapshots the source in O(files), hands the snapshot to the loop
and returns a :class:`~uploader.handle.CheckpointHandle` at once. At most
``max_pending`` snapshots exist at a time: ``save()`` blocks while that many are being
uploaded. Every request in the loop takes a slot of one shared limiter.

Commit order per checkpoint: data objects, then the manifest (the commit point), then
the ``latest.json`` hint.

Incremental: a file whose bytes the scope's newest committed checkpoint already stored (the
same SHA-256, see :mod:`uploader.incremental`) is not uploaded; its entry points at that
object, which is confirmed by the store's checksum of it before the manifest is written.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import math
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal

from .backends.base import Backend, TransferContext
from .config import Settings
from .errors import (
    CheckpointError,
    ChecksumMismatchError,
    EngineClosedError,
    LoadError,
    ManifestError,
    SnapshotError,
    TornCheckpointError,
    UploadError,
    first_error,
)
from .handle import CheckpointHandle, CheckpointState
from .incremental import Bases, References, sha256_file
from .layout import CheckpointKeys
from .leases import SaveLease
from .manifest import FileEntry, Manifest, checked_paths, freeze_metadata
from .mappings import shared_writable_files
from .placing import place
from .retry import RetryPolicy
from .rewrites import RewriteTracker
from .snapshot import Snapshot, SnapshotFile, take_snapshot
from .written import WrittenManifests

__all__ = ["BackendFactory", "CommitListener", "DrainProgress", "DrainReport", "Engine",
           "SaveRequest"]

BackendFactory = Callable[[TransferContext], Backend]
CommitListener = Callable[[CheckpointHandle], None]
T = TypeVar("T")

TORN_ADVICE = (
    "From now on save() freezes that file privately (a clone, else a copy), so later "
    "checkpoints commit. To keep save() O(files), write each file under a new name and "
    "os.replace() it over the old one, or call save(wait=True) before rewriting it."
)
TORN_WHILE_FROZEN_ADVICE = (
    "It was being written while save() read it: call save() once the file is written "
    "(not while another thread or process writes it), or write it under a new name and "
    "os.replace() it over the old one."
)
REWRITE_ADVICE = (
    "torch.save(), safetensors' save_file() and open(path, 'wb') rewrite the same inode, "
    "which a hardlink snapshot shares. To keep save() O(files), write each checkpoint file "
    "under a new name and os.replace() it over the old one."
)


def _utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


async def _each(fn: Callable[[T], Coroutine[Any, Any, object]], items: Iterable[T]) -> None:
    """``fn(item)`` for every item, concurrently; raises the error that failed one of
    them, not the cancellations it caused in the others."""
    try:
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(fn, item)
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SaveRequest:
    source: str
    keys: CheckpointKeys
    name: str
    latest: bool
    metadata: dict[str, Any]
    identity: dict[str, Any]
    reference: dict[str, Any]  # filled in further on commit; returned by wait()


@dataclasses.dataclass(frozen=True)
class DrainReport:
    """Where every checkpoint of an engine stands after a drain."""

    handles: tuple[CheckpointHandle, ...]

    def _in(self, state: CheckpointState) -> list[CheckpointHandle]:
        return [h for h in self.handles if h.state is state]

    @property
    def committed(self) -> list[CheckpointHandle]:
        return self._in(CheckpointState.COMMITTED)

    @property
    def failed(self) -> list[CheckpointHandle]:
        return self._in(CheckpointState.FAILED)

    @property
    def pending(self) -> list[CheckpointHandle]:
        return [h for h in self.handles if not h.done()]

    @property
    def torn_unsuperseded(self) -> list[CheckpointHandle]:
        """Torn checkpoints that no later committed save of the same name and scope replaced.

        Only like replaces like: a later "last" never stands in for a torn "best".
        """
        out = []
        replaced: set[tuple[str, str]] = set()
        for h in reversed(self.handles):
            if h.state is CheckpointState.COMMITTED:
                replaced.add((h.scope, h.name))
            elif h.state is CheckpointState.TORN and (h.scope, h.name) not in replaced:
                out.append(h)
        out.reverse()
        return out


@dataclasses.dataclass(frozen=True)
class DrainProgress:
    """How far the uploads a drain waits for are, for a progress line."""

    pending: int  # checkpoints not yet final
    bytes_left: int  # of those, bytes neither uploaded nor found unchanged yet
    waited_s: float  # since the drain started


class _Torn(Exception):
    def __init__(self, file: SnapshotFile) -> None:
        self.file = file


def _naming(e: UploadError, req: SaveRequest, what: str, key: str) -> UploadError:
    """The backend's error, of the same class, prefixed with the checkpoint it broke."""
    cid = req.keys.checkpoint_id
    return type(e)(f"checkpoint {req.name!r} ({cid}), {what}: {e}", checkpoint_id=cid,
                   key=e.key or key)


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


def _load_staging(dest: str) -> str:
    # Inside the destination: on its filesystem, so files are renamed into place.
    os.makedirs(dest, exist_ok=True)
    return tempfile.mkdtemp(prefix=".ckpt-load-", dir=dest)


def _place(staging: str, dest: str, paths: list[list[str]], who: str) -> None:
    """Move verified files from ``staging`` (named by index) to their paths under ``dest``
    (:func:`uploader.placing.place`); a conflict is a :class:`LoadError`."""
    def refuse(path: str, rel: str, what: str) -> LoadError:
        return LoadError(f"{who}: cannot load {rel!r} into {dest!r}: {path!r} is {what}. Load "
                         "into an empty directory, or remove it first.")

    place(staging, dest, paths, kind="checkpoint", refuse=refuse)


_live_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
# What forked children inherited from their parent's engines, kept referenced forever:
# collecting the parent's portal context would try to stop a loop that has no thread here.
_inherited: list[object] = []


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker, a multiprocessing helper) has none of the
    # parent's threads: its copy of every engine must never wait on the parent's loop.
    for engine in list(_live_engines):
        engine._forget_parent()


def _close_at_exit() -> None:
    # Stop every loop while its thread can still run: left to interpreter shutdown, the
    # portal's cleanup would wait on a thread that is already frozen.
    for engine in list(_live_engines):
        if engine._forked_from is None or engine._portal is not None:
            engine.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)


class Engine:
    """Background uploader for checkpoints. Thread-safe; one per task.

    In a process forked from the one that made it, an engine starts afresh: it never
    touches the parent's loop or uploads, and its saves complete before ``save()``
    returns (nothing in a child drains them at exit).
    """

    def __init__(
        self,
        backend_factory: BackendFactory,
        settings: Settings,
        *,
        snapshot_dir: str,
        log: Callable[[str], None] = print,
        on_commit: Callable[[CheckpointHandle], None] | None = None,
        hasher: Callable[[str], str] | None = None,
    ) -> None:
        """``on_commit(handle)`` runs on the engine's loop thread each time a checkpoint is
        committed (its stats are final then); it must not block. ``hasher(path)`` returns
        a file's SHA-256 hex digest, to tell an unchanged file from a changed one; by
        default the backend's ``digest_file`` reads it where its uploads are read (the
        S3 backend's worker process), else a thread of this process does."""
        self.settings = settings
        self._backend_factory = backend_factory
        self._snapshot_dir = snapshot_dir
        self._log = log
        self._on_commit = on_commit
        self._hasher = hasher
        self._closed = False
        self._forked_from: int | None = None
        self._fresh_state()
        _live_engines.add(self)

    def _fresh_state(self) -> None:
        self._slots = threading.BoundedSemaphore(self.settings.max_pending)
        self._handles: list[CheckpointHandle] = []
        self._lock = threading.Lock()
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._backend: Backend | None = None
        self._ctx: TransferContext | None = None
        self._bases = Bases()  # touched only on the loop thread
        self._refs = References()
        self._written = WrittenManifests()  # the manifests this engine committed
        # Held on the loop from a save's check that the objects it points at exist until
        # its manifest is written, and by delete_unreferenced(): see there.
        self._pointing: anyio.Lock | None = None
        # Prune markers of this process's own prunes (uploader.leases): its saves never
        # wait for them, the pointing lock already keeps the two apart.
        self._own_markers: frozenset[str] = frozenset()
        self._told_torn = False
        self._hinted: dict[str, str] = {}
        self._newest: dict[tuple[str, str], CheckpointHandle] = {}  # per (scope, name)
        self._rewrites = RewriteTracker()
        self._told_rewrite = False
        self._warned: set[str] = set()
        # Forgotten on fork, like everything here: a child's engine has no one listening.
        self._commit_listeners: list[CommitListener] = []

    def _forget_parent(self) -> None:
        # Runs in the child right after fork(), single-threaded: the locks, the portal
        # and the handles all belong to the parent (its loop thread was not copied).
        self._forked_from = os.getppid()
        _inherited.append((self._portal_cm, self._portal, self._backend, self._handles))
        self._fresh_state()

    def warn_once(self, topic: str, message: str) -> None:
        """Log ``message`` the first time ``topic`` (a key, a path) comes up in this engine."""
        if topic not in self._warned:
            self._warned.add(topic)
            self._log(message)

    @property
    def synchronous(self) -> bool:
        """True in a forked child, where ``save()`` returns only once the upload is done."""
        return self._forked_from is not None

    # -- lifecycle ---------------------------------------------------------------

    def _ensure_started(self) -> BlockingPortal:
        if self._closed:
            raise EngineClosedError("Cannot use the checkpoint engine once it has been closed.")
        with self._lock:
            if self._portal is None:
                cm = start_blocking_portal("asyncio", name="checkpoint-uploader")
                portal = cm.__enter__()
                try:
                    self._backend = portal.call(self._open_backend)
                except BaseException:
                    cm.__exit__(None, None, None)
                    raise
                self._portal_cm, self._portal = cm, portal
            return self._portal

    async def _open_backend(self) -> Backend:
        s = self.settings
        ctx = TransferContext(
            settings=s,
            limiter=anyio.CapacityLimiter(s.upload_concurrency),
            retry=RetryPolicy(max_attempts=s.max_attempts, deadline=s.retry_deadline),
            log=self._log,
        )
        self._ctx = ctx
        return self._backend_factory(ctx)

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the engine's loop; from any thread but that loop's own.

        How code outside the engine (retention, tools) talks to :attr:`backend`, whose
        methods all run on the loop.
        """
        return self._ensure_started().call(fn, *args)

    def add_commit_listener(self, listener: CommitListener) -> None:
        """Call ``listener(handle)`` each time a checkpoint's manifest is written.

        It runs on the engine's loop, after the commit and before the handle completes
        (so a drain that sees the handle done sees what the listener started), and must
        return at once: start work elsewhere, never wait on the loop. An exception it
        raises is logged and changes nothing about the checkpoint.
        """
        self._commit_listeners.append(listener)

    @property
    def backend(self) -> Backend:
        self._ensure_started()
        assert self._backend is not None
        return self._backend

    def close(self) -> None:
        """Stop the loop. Uploads still pending are abandoned (drain first to avoid that)."""
        if self._closed:
            return
        self._closed = True
        portal, cm = self._portal, self._portal_cm
        if portal is None or cm is None:
            return
        if any(not h.done() for h in self.handles):
            # Don't join a loop that is stuck in a transfer: its thread is a daemon.
            portal.start_task_soon(portal.stop, True)
            return
        try:
            if self._backend is not None:
                portal.call(self._backend.aclose)
        finally:
            cm.__exit__(None, None, None)

    # -- saving ------------------------------------------------------------------

    @property
    def handles(self) -> tuple[CheckpointHandle, ...]:
        with self._lock:
            return tuple(self._handles)

    def set_base(self, keys: CheckpointKeys, manifest: Manifest) -> None:
        """Tell the engine of a committed checkpoint in its own store (one a task loaded as
        it started), so later saves of its scope skip the files it already holds.

        ``keys`` are where the manifest was read, in this engine's backend. A checkpoint
        this engine commits in that scope takes over as the base.
        """
        if keys.scope_prefix != manifest.scope_prefix:
            raise ValueError(f"the manifest at {keys.manifest!r} names the scope "
                             f"{manifest.scope_prefix!r}; not using it as a base")
        self._ensure_started().call(lambda: self._bases.offer(keys, manifest, own=False))

    def referenced_keys(self) -> set[str]:
        """Full keys of stored objects that saves of this engine, not yet final, point at
        instead of uploading: a pruner must not remove them. Safe from any thread."""
        return self._refs.all()

    def delete_unreferenced(self, keys: Sequence[str]) -> tuple[list[str],
                                                                  list[tuple[str, str]]]:
        """Delete those of ``keys`` that no save of this engine points at; return
        ``(deleted, failed)``, ``failed`` as ``(key, reason)``. From any thread but the loop.

        A save registers what it points at, then checks that each object still exists,
        then writes its manifest; this deletion and that check-and-commit exclude each
        other. So either the save registered first and its objects are spared here, or
        the deletion came first and the save finds them gone and uploads them again: a
        committed manifest never points at an object this engine deleted.
        """
        return self.run(self._delete_unreferenced, list(keys))

    def own_prune_marker(self, key: str, live: bool) -> None:
        """Tell the engine that a prune marker (:mod:`uploader.leases`) is this process's
        own (``live``) or is gone; from any thread."""
        with self._lock:
            self._own_markers = (self._own_markers | {key} if live
                                 else self._own_markers - {key})

    def _pointing_lock(self) -> anyio.Lock:
        if self._pointing is None:  # made on the loop, the only place it is used
            self._pointing = anyio.Lock()
        return self._pointing

    async def _delete_unreferenced(self, keys: list[str]
                                   ) -> tuple[list[str], list[tuple[str, str]]]:
        backend = self._backend
        assert backend is not None
        async with self._pointing_lock():
            refs = self._refs.all()
            doomed = [k for k in keys if k not in refs]
            failed = await backend.delete_keys(doomed) if doomed else []
        gone = {k for k, _ in failed}
        return [k for k in doomed if k not in gone], failed

    def save(self, request: SaveRequest) -> CheckpointHandle:
        """Snapshot ``request.source`` now and upload it in the background.

        Blocks only while ``max_pending`` earlier snapshots are still pending. Raises
        :class:`~uploader.errors.SnapshotError` in the caller's thread when the source
        cannot be snapshotted; nothing is uploaded then.
        """
        portal = self._ensure_started()
        t0, saved_at = time.perf_counter(), time.time()
        # Frozen now: a dict the caller changes after save() returns changes nothing stored,
        # and nothing in it can fail the commit later.
        metadata, replaced = freeze_metadata(request.metadata)
        if replaced:
            self._log(f"WARNING: checkpoint {request.name!r}: {', '.join(replaced[:5])} cannot "
                      "be JSON serialized, so the manifest records '<value cannot be JSON "
                      "serialized>' instead. Convert such values to str, numbers, lists or "
                      "dicts before save().")
        request = dataclasses.replace(request, metadata=metadata)
        self._slots.acquire()
        try:
            with _collector_paused():
                snap = take_snapshot(request.source, self._snapshot_dir,
                                     mode=self.settings.snapshot,
                                     copy_budget=self.settings.copy_budget,
                                     private=self._rewrites.must_freeze,
                                     mapped=shared_writable_files)
        except BaseException:
            self._slots.release()
            raise
        try:
            self._check_keys(request, snap)
        except BaseException:
            snap.release()
            self._slots.release()
            raise
        if snap.skipped:
            self._note_skipped(request, snap)
        key = (request.keys.scope_prefix, request.name)
        handle = CheckpointHandle(request.keys.checkpoint_id, request.name, request.reference,
                                  request.source, scope=key[0])
        handle.stats.saved_at = saved_at
        handle.stats.files, handle.stats.bytes = len(snap.files), snap.total_bytes
        handle.stats.private_bytes = snap.private_bytes
        with self._lock:
            previous = self._newest.get(key)
            self._newest[key] = handle
            self._handles.append(handle)
            handle.number = len(self._handles)
        events = self._rewrites.saved(snap, handle)
        if snap.private:
            self._note_private(snap)
        if snap.mapped:
            self._note_mapped(request, snap)
        # Only the previous newest of this name can be torn and not yet noted: one torn
        # while a newer save of its name existed was noted when it tore.
        if previous is not None and previous.state is CheckpointState.TORN:
            self._note_superseded(previous)
        # Before the upload is queued: a small one may commit, and be reported with this
        # figure, before the line after start_task_soon() would run.
        handle.stats.blocked_s = time.perf_counter() - t0
        try:
            portal.start_task_soon(self._upload, handle, request, snap, events)
        except BaseException as e:
            snap.release()
            self._slots.release()
            handle._transition(CheckpointState.FAILED, UploadError(
                f"checkpoint {request.name!r} could not be queued: {e}",
                checkpoint_id=handle.checkpoint_id))
        if self.synchronous:
            handle._done.wait()
        return handle

    def _check_keys(self, request: SaveRequest, snap: Snapshot) -> None:
        # In save(), where the user can rename the file, rather than in a failed upload.
        assert self._backend is not None
        limit = _MAX_KEY_BYTES.get(self._backend.kind)
        if limit is None:
            return
        # A file's key is its checkpoint's data prefix and its relative path: the
        # prefix's stored length is found once, not per file (10,000 small files).
        url = self._backend.url_of(request.keys.data_prefix)
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
                    f"at a key of {n} bytes, more than the {limit} the {self._backend.kind} "
                    "store takes. Shorten its path (its directories and name).")

    def _note_skipped(self, request: SaveRequest, snap: Snapshot) -> None:
        new = [r for r in snap.skipped if r not in self._warned]
        if not new:
            return
        self._warned.update(new)
        names = ", ".join(repr(r) for r in new[:5]) + (", ..." if len(new) > 5 else "")
        self._log(f"note: checkpoint {request.name!r} leaves out {names} under "
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
        self._log(f"note: {names} {'is' if one else 'are'} rewritten in place while an upload "
                  f"of {it} is pending, so @checkpoint {cost}. {REWRITE_ADVICE} "
                  "This note is shown once per task.")

    def _note_mapped(self, request: SaveRequest, snap: Snapshot) -> None:
        new = [r for r in snap.mapped if f"mapped:{r}" not in self._warned]
        if not new:
            return
        self._warned.update(f"mapped:{r}" for r in new)
        names = ", ".join(repr(r) for r in new[:3]) + (", ..." if len(new) > 3 else "")
        self._log(f"note: checkpoint {request.name!r}: {names} under {request.source} "
                  f"{'is' if len(new) == 1 else 'are'} mapped shared and writable by this "
                  "task (mmap, numpy.memmap), so save() copies it rather than linking it: a "
                  "write through the mapping changes no timestamp a check could see. To "
                  "keep save() O(files), flush and close the mapping, or save a copy. "
                  "This note is shown once per file.")

    async def _upload(self, handle: CheckpointHandle, req: SaveRequest, snap: Snapshot,
                      events: dict[str, object]) -> None:
        assert self._backend is not None
        lease = SaveLease(self._backend, req.keys)

        def warn(msg: str) -> None:
            self.warn_once(f"lease:{req.keys.scope_prefix}", f"WARNING: {msg}")

        # The lease is renewed for as long as the upload lasts (uploader.leases).
        async with anyio.create_task_group() as tg:
            tg.start_soon(lease.keep_alive, warn)
            try:
                await self._upload_one(handle, req, snap, events, lease)
            finally:
                tg.cancel_scope.cancel()

    async def _digest(self, backend: Backend, f: SnapshotFile) -> str:
        """The SHA-256 of a snapshot file, for the unchanged check: read where the
        backend reads its uploads when it says where (``digest_file``), else in a thread."""
        on_backend = getattr(backend, "digest_file", None)
        if self._hasher is None and on_backend is not None:
            digest: str = await on_backend(f.path, f.size)
            return digest
        return await anyio.to_thread.run_sync(self._hasher or sha256_file, f.path)

    async def _upload_one(self, handle: CheckpointHandle, req: SaveRequest, snap: Snapshot,
                          events: dict[str, object], lease: SaveLease) -> None:
        backend, ctx = self._backend, self._ctx
        assert backend is not None and ctx is not None
        keys = req.keys
        stats = handle.stats
        t0 = time.monotonic()
        entries: dict[str, FileEntry] = {}
        # The newest committed checkpoint of the scope as this upload starts: files that
        # hold the same bytes point at its objects instead of being uploaded again.
        base = self._bases.get(keys.scope_prefix) if self.settings.incremental else None

        def check(f: SnapshotFile) -> None:
            # One rule for every freeze (see snapshot.py): a link now, the rest as made.
            if not self._rewrites.unchanged(f, events):
                raise _Torn(f)

        async def unchanged(f: SnapshotFile) -> FileEntry | None:
            """An entry pointing at the base's object if ``f`` holds the same bytes."""
            old = None if base is None else base.candidate(f.relpath, f.size)
            if base is None or old is None:
                return None
            if f.data is not None:  # a small file save() read into memory
                digest = hashlib.sha256(f.data).hexdigest()
            else:
                check(f)
                try:
                    async with ctx.limiter:  # bounds open files and buffers, as uploads do
                        digest = await self._digest(backend, f)
                except OSError:
                    check(f)
                    return None  # the upload reads it again, and explains what is wrong
            # As after an upload: bytes read from a file rewritten meanwhile commit nothing.
            check(f)
            if digest != old.sha256:
                return None
            origin = base.origin(old)
            # Before it is confirmed and committed, so a pruner leaves the object alone.
            self._refs.add(keys.checkpoint_id, keys.stored(f.relpath, origin))
            return FileEntry(f.relpath, f.size, digest, origin)

        def frozen_whole(f: SnapshotFile) -> None:
            # A file torn as it was frozen fails the checkpoint before any upload. A linked
            # one is compared after it is read: a read that fails (its permissions changed)
            # says so, rather than calling the file rewritten.
            if not f.whole:
                raise _Torn(f)

        async def one(f: SnapshotFile) -> None:
            frozen_whole(f)
            entry = await unchanged(f)
            if entry is None:
                await upload(f)
                return
            entries[f.relpath] = entry
            stats.files_skipped += 1
            stats.bytes_skipped += f.size

        async def confirm(f: SnapshotFile) -> None:
            # The object may have been removed or changed since the base was committed (a
            # pruner, a lifecycle rule, a person, another tool): then this file is
            # uploaded after all. By the store's checksum, never by size alone, so a
            # same-size corruption never spreads to later checkpoints.
            entry = entries[f.relpath]
            key = keys.stored(f.relpath, entry.key)
            try:
                why = await backend.confirm(key, f.size, entry.sha256,
                                            f.path if f.data is None else f.data)
            except CheckpointError as e:
                why = f"it could not be looked at ({e})"
            if why is None:
                return
            self._log(f"note: checkpoint {req.name!r} ({keys.checkpoint_id}): {f.relpath!r} "
                      f"is unchanged, but the stored copy at {backend.url_of(key)} that it "
                      f"would point at is not usable ({why}); uploading it again.")
            stats.files_skipped -= 1
            stats.bytes_skipped -= f.size
            await upload(f)

        async def upload(f: SnapshotFile) -> None:
            frozen_whole(f)
            key = keys.data(f.relpath)
            try:
                if f.data is not None:
                    await backend.put_bytes(key, f.data)
                    digest = hashlib.sha256(f.data).hexdigest()
                else:
                    digest = await backend.put_file(key, f.path, f.size)
            except UploadError as e:
                raise _naming(e, req, f"file {f.relpath!r}", key) from e
            except CheckpointError:
                raise
            except Exception as e:
                check(f)  # a file truncated under the reader is a torn file, not a failure
                raise UploadError(
                    f"checkpoint {req.name!r} ({keys.checkpoint_id}): uploading {f.relpath!r} "
                    f"to {backend.url_of(key)} failed: {e}",
                    checkpoint_id=keys.checkpoint_id, key=key) from e
            check(f)
            entries[f.relpath] = FileEntry(f.relpath, f.size, digest)
            stats.bytes_uploaded += f.size  # per file: the progress costs nothing per byte

        def unpoint(f: SnapshotFile) -> None:
            # An unchanged file that is uploaded after all.
            stats.files_skipped -= 1
            stats.bytes_skipped -= f.size

        async def reconfirm(f: SnapshotFile) -> None:
            # This save's own object, which a prune may have taken for debris while the
            # lease could not be renewed: uploaded again if it is not there whole.
            entry = entries[f.relpath]
            key = keys.data(f.relpath)
            try:
                why = await backend.confirm(key, f.size, entry.sha256,
                                            f.path if f.data is None else f.data)
            except CheckpointError as e:
                why = f"it could not be looked at ({e})"
            if why is not None:
                self._log(f"note: checkpoint {req.name!r} ({keys.checkpoint_id}): the "
                          f"uploaded {f.relpath!r} at {backend.url_of(key)} is not usable "
                          f"({why}); uploading it again.")
                stats.bytes_uploaded -= f.size
                await upload(f)

        def build() -> Manifest:
            return Manifest(
                checkpoint_id=keys.checkpoint_id, name=req.name, run_id=keys.run_id,
                scope_prefix=keys.scope_prefix,
                created_on=req.reference.get("created_on", ""),
                committed_on=_utcnow(), latest=req.latest,
                files=tuple(entries[f.relpath] for f in snap.files),
                metadata=req.metadata, identity=req.identity,
                source="file" if os.path.isfile(req.source) else "directory",
                timings={"snapshot_s": snap.seconds, "upload_s": time.monotonic() - t0},
                bytes_skipped=stats.bytes_skipped,
            )

        async def write_manifest(manifest: Manifest) -> None:
            data = manifest.to_json()
            try:
                await backend.put_bytes(keys.manifest, data)
            except UploadError as e:
                raise _naming(e, req, "writing its manifest", keys.manifest) from e
            self._written.put(keys.manifest, data)

        async def missing(files: list[SnapshotFile]) -> list[SnapshotFile]:
            # One listing per checkpoint pointed into, not a request per file.
            where = {f.relpath: keys.stored(f.relpath, entries[f.relpath].key) for f in files}
            head = f"{keys.scope_prefix}/data/"
            prefixes = {head + "/".join(k[len(head):].split("/", 2)[:2]) + "/"
                        for k in where.values()}
            found: set[str] = set()

            async def look(prefix: str) -> None:
                found.update(await backend.list_keys(prefix))

            await _each(look, prefixes)
            return [f for f in files if where[f.relpath] not in found]

        try:
            handle._transition(CheckpointState.UPLOADING)
            try:
                # Before the first byte of data: a prune anywhere spares what it covers.
                await lease.write()
            except UploadError as e:
                raise _naming(e, req, "writing its lease", lease.key) from e
            await _each(one, snap.files)
            pointing = [f for f in snap.files if entries[f.relpath].key is not None]
            if pointing:
                # Rule 2 of uploader.leases: say what it points at, then let the prunes
                # of other processes end before checking that those objects exist.
                await lease.write([keys.stored(f.relpath, entries[f.relpath].key)
                                   for f in pointing])
                if not await lease.await_prunes(lambda: self._own_markers):
                    self._log(f"note: checkpoint {req.name!r} ({keys.checkpoint_id}): a "
                              "prune of another process is still running in its scope, so "
                              f"its {len(pointing)} unchanged file(s) are uploaded rather "
                              "than pointed at.")
                    for f in pointing:
                        unpoint(f)
                    await _each(upload, pointing)
                    pointing = []
            if lease.lapsed:
                await lease.write()
                await lease.await_prunes(lambda: self._own_markers)
                await _each(reconfirm, [f for f in snap.files
                                        if entries[f.relpath].key is None])
            # Until the manifest is written, no deletion through this engine runs between
            # the check that those objects exist and the commit (delete_unreferenced).
            guard = self._pointing_lock() if pointing else contextlib.nullcontext()
            async with guard:
                await _each(confirm, pointing)
                manifest = build()
                await write_manifest(manifest)
            # What it points at is looked at once more: the protocol makes a deletion
            # here impossible for every pruner that follows it, but not for a person or a
            # lifecycle rule. Whatever went is uploaded and the manifest written again.
            pointing = [f for f in pointing if entries[f.relpath].key is not None]
            gone = await missing(pointing) if pointing else []
            if gone and await backend.stat(keys.manifest) is None:
                gone = []  # pruned already, with what it pointed at: nothing to mend
            if gone:
                first = keys.stored(gone[0].relpath, entries[gone[0].relpath].key)
                self._log(f"WARNING: checkpoint {req.name!r} ({keys.checkpoint_id}): "
                          f"{len(gone)} object(s) it points at were deleted as it committed "
                          f"(e.g. {backend.url_of(first)}), not by a prune of this "
                          "package; uploading those files and writing the manifest again.")
                try:
                    for f in gone:
                        unpoint(f)
                    await _each(upload, gone)
                    manifest = build()
                    await write_manifest(manifest)
                except BaseException:
                    self._written.forget([keys.manifest])
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await backend.delete_keys([keys.manifest])
                    raise
            req.reference["size"] = manifest.total_bytes
            if req.latest:
                # Before the handle completes, so whoever waits on it sees the hint too;
                # shielded, since the checkpoint is already committed by its manifest.
                with anyio.move_on_after(30, shield=True):
                    await self._write_latest_hint(keys)
            self._bases.offer(keys, manifest, own=True)
            handle._transition(CheckpointState.COMMITTED,
                               before_done=lambda: self._committed(handle))
        except _Torn as t:
            # Freeze this path privately from now on: at most this checkpoint is lost.
            self._rewrites.torn(t.file)
            newer = self._has_newer(handle)
            when, advice = (("while its upload was pending", TORN_ADVICE) if t.file.shared
                            else ("while save() froze it", TORN_WHILE_FROZEN_ADVICE))
            msg = (f"checkpoint {req.name!r} ({keys.checkpoint_id}) was not committed: "
                   f"{t.file.relpath!r} was rewritten in place {when}. ")
            handle._transition(CheckpointState.TORN, TornCheckpointError(
                msg + advice, checkpoint_id=keys.checkpoint_id, path=t.file.relpath))
            if newer:
                self._note_superseded(handle)
            # Else a save may still come and supersede it; drain() reports it if none does.
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                handle._transition(CheckpointState.FAILED, UploadError(
                    f"checkpoint {req.name!r} ({keys.checkpoint_id}) was abandoned before it "
                    "was committed (the uploader was stopped).",
                    checkpoint_id=keys.checkpoint_id))
            raise
        except CheckpointError as e:
            handle._transition(CheckpointState.FAILED, e)
            self._log(f"ERROR: {e}")
        except Exception as e:
            err = UploadError(f"checkpoint {req.name!r} ({keys.checkpoint_id}) failed: "
                              f"{type(e).__name__}: {e}", checkpoint_id=keys.checkpoint_id)
            handle._transition(CheckpointState.FAILED, err)
            self._log(f"ERROR: {err}")
        finally:
            self._refs.drop(keys.checkpoint_id)
            with anyio.CancelScope(shield=True):
                self._rewrites.released(snap)
                await anyio.to_thread.run_sync(snap.release)
            self._slots.release()
            # Last: the snapshot and the pending slot are not held while the store answers.
            if lease.written is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(30), \
                        contextlib.suppress(Exception):
                    await lease.release()  # else it expires

    def _committed(self, handle: CheckpointHandle) -> None:
        # Before the handle's waiters wake: a task that waited on a save logs its commit
        # line before whatever it does next, and a drain that sees the handle done sees
        # what a listener started (a prune). Neither a report nor a listener that fails
        # ever fails the checkpoint.
        listeners = [] if self._on_commit is None else [self._on_commit]
        for listener in (*listeners, *self._commit_listeners):
            try:
                listener(handle)
            except Exception as e:
                self.warn_once(f"on_commit {type(e).__name__}: {e}",
                               f"WARNING: after committing checkpoint {handle.checkpoint_id}: "
                               f"{type(e).__name__}: {e}")

    def _note_superseded(self, torn: CheckpointHandle) -> None:
        # Said once per engine: a torn checkpoint a newer save replaces costs nothing but
        # the upload, and the advice is the same every time.
        if not self._told_torn:
            self._told_torn = True
            self._log(f"note: {torn.error} A newer save supersedes it; this note is shown "
                      "once per task.")

    def _has_newer(self, handle: CheckpointHandle) -> bool:
        # No lock: a dict read is atomic, and the loop thread must never wait on a lock
        # that a signal handler's interrupted code may hold.
        return self._newest.get((handle.scope, handle.name)) is not handle

    async def _write_latest_hint(self, keys: CheckpointKeys) -> None:
        # Only a hint for humans and tools; readers list manifests. Never fails a checkpoint.
        # Commits can finish out of order: never point the hint back at an older save.
        hinted = self._hinted.get(keys.scope_prefix, "")
        if keys.checkpoint_id <= hinted:
            return
        self._hinted[keys.scope_prefix] = keys.checkpoint_id
        hint = f'{{"checkpoint_id": "{keys.checkpoint_id}", "manifest": "{keys.manifest}"}}\n'
        assert self._backend is not None
        try:
            await self._backend.put_bytes(f"{keys.scope_prefix}/latest.json", hint.encode())
        except Exception as e:
            self._log(f"note: could not update the latest-checkpoint hint: {e}")

    def drain(self, timeout: float | None = None, *,
              progress: Callable[[DrainProgress], None] | None = None) -> DrainReport:
        """Wait up to ``timeout`` seconds for every upload: None means the drain timeout
        of the settings, ``math.inf`` until every one is done.

        ``progress`` is called (in the caller's thread) every ``progress_interval`` seconds
        of the settings while uploads are still pending.
        """
        limit = self.settings.drain_timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = start + limit
        every = self.settings.progress_interval
        next_report = start + every
        handles = self.handles
        for h in handles:
            while True:
                now = time.monotonic()
                until = deadline if progress is None else min(deadline, next_report)
                if h._done.wait(None if math.isinf(until) else max(0.0, until - now)):
                    break
                now = time.monotonic()
                if now >= deadline:
                    break
                if progress is not None and now >= next_report:
                    pending = [p for p in handles if not p.done()]
                    progress(DrainProgress(
                        pending=len(pending), waited_s=now - start,
                        bytes_left=sum(p.stats.bytes_left for p in pending)))
                    next_report = time.monotonic() + every
        return DrainReport(self.handles)

    def drain_for_signal(self, timeout: float) -> DrainReport:
        """Like :meth:`drain`, for a signal handler: takes no lock and waits on no event.

        The handler runs on the main thread between two bytecodes of whatever it
        interrupted, which may hold this engine's lock or be inside an event's wait.
        """
        deadline = time.monotonic() + timeout
        handles = tuple(self._handles)  # a list copy is atomic; no lock
        # The state, not the event: the event's set() may wait on a lock the interrupted
        # code holds, but the state is final before it. Handles mostly finish in order:
        # each is looked at until it is final, never again after, so polling is linear.
        i = 0
        while True:
            while i < len(handles) and handles[i].state.is_final:
                i += 1
            if i == len(handles) or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return DrainReport(handles)

    # -- reading -----------------------------------------------------------------

    def list_manifest_keys(self, prefix: str) -> list[CheckpointKeys]:
        """Committed checkpoints under a scope's ``manifests/`` prefix, newest first."""
        out = []
        for k in self.list_keys(prefix):
            try:
                out.append(CheckpointKeys.from_manifest_key(k))
            except ValueError:
                continue
        return CheckpointKeys.newest_first(out)

    def read_manifest(self, keys: CheckpointKeys) -> Manifest | None:
        portal = self._ensure_started()
        data = portal.call(self.backend.get_bytes, keys.manifest)
        return None if data is None else Manifest.from_json(data)

    def read_manifests(self, keys: Sequence[CheckpointKeys], *, remembered: bool = False
                       ) -> list[Manifest | ManifestError | None]:
        """The manifest at each of ``keys``, in that order: None where there is none, and
        the :class:`ManifestError` where one cannot be read (so a listing can skip it).

        Read concurrently, each GET bounded by the backend: on S3 a round trip costs
        20-50 ms, and 1,000 checkpoints read one at a time took tens of seconds.
        ``remembered``: the keys were just listed in the store, and a manifest this
        engine committed is taken as it wrote it rather than read again (see
        :mod:`uploader.written`); what retention and repairs read is always the store's.
        """
        out: list[Manifest | ManifestError | None] = []
        kept = [self._written.get(k.manifest) if remembered else None for k in keys]
        read = iter(self.read_objects([k.manifest for k, b in zip(keys, kept, strict=True)
                                       if b is None]))
        for data in (next(read) if b is None else b for b in kept):
            try:
                out.append(None if data is None else Manifest.from_json(data))
            except ManifestError as e:
                out.append(e)
        return out

    def read_objects(self, keys: Sequence[str]) -> list[bytes | None]:
        """The bytes under each of ``keys`` (None where there is none), read concurrently.

        Manifests are read through :meth:`read_manifests`, and checkpoints' data through
        :meth:`load`; this is for the rest (another package's metadata).
        """
        portal = self._ensure_started()
        return portal.call(self._get_all, list(keys))

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in no particular order."""
        return self.run(self.backend.list_keys, prefix)

    def fetch(self, objects: Sequence[tuple[str, str, int | None]], dest: str, *,
              who: str, total: int | None = None) -> list[tuple[int, str]]:
        """Copy objects stored without a manifest into ``dest``: all or nothing.

        ``objects`` are ``(key, relative path, expected size or None)``. For data another
        writer stored with no checksums to verify against: each object's size is checked
        where one is expected (and their sum, where ``total`` is given), and its SHA-256
        computed while it is written. Returns
        ``(bytes, sha256)`` per object, in order. Files land in ``dest`` only once every
        one arrived, never through a symlink already there. Raises
        :class:`~uploader.errors.LoadError` naming ``who``, the path and the key.
        """
        paths = checked_paths([rel for _, rel, _ in objects], who)
        portal = self._ensure_started()
        return portal.call(self._fetch, list(objects), paths, dest, who, total)

    async def _fetch(self, objects: list[tuple[str, str, int | None]], paths: list[list[str]],
                     dest: str, who: str, total: int | None) -> list[tuple[int, str]]:
        got: list[tuple[int, str]] = [(0, "")] * len(objects)

        async def check(i: int, what: str, target: str, digest: str) -> None:
            size = objects[i][2]
            n = (await anyio.to_thread.run_sync(os.stat, target)).st_size
            if size is not None and n != size:
                raise LoadError(f"{what} has {n} bytes, but {size} were stored. The stored "
                                "copy is incomplete or was changed.")
            got[i] = (n, digest)

        def whole() -> None:
            received = sum(n for n, _ in got)
            if total is not None and received != total:
                raise LoadError(f"{who}: its files hold {received} bytes, but {total} were "
                                "stored. A file is missing or was changed in the store.")

        # A size of 0 asks the backend for the object in one stream, whatever it is.
        await self._download(dest, who, paths, [(key, rel, size or 0)
                                                for key, rel, size in objects], check, whole)
        return got

    async def _get_all(self, keys: list[str]) -> list[bytes | None]:
        backend = self._backend
        assert backend is not None
        got: list[bytes | None] = [None] * len(keys)

        async def one(i: int) -> None:
            got[i] = await backend.get_bytes(keys[i])

        await _each(one, range(len(keys)))
        return got

    def load(self, manifest: Manifest, dest: str, *, keys: CheckpointKeys | None = None
             ) -> None:
        """Copy a committed checkpoint's files into ``dest``, verifying every checksum.

        ``keys`` are those the manifest was read at (readers always pass them: where data
        is read from must not depend on what a manifest's body says); without them, the
        body's own fields name the keys. For a checkpoint of a single file, ``dest`` is
        the directory the file lands in. All or nothing: files are placed in ``dest`` only
        once every one is downloaded and verified. Raises :class:`~uploader.errors.LoadError`
        (:class:`~uploader.errors.ChecksumMismatchError` for corrupt bytes) naming the
        checkpoint, the file and the key.
        """
        if keys is None:
            keys = CheckpointKeys(manifest.scope_prefix, manifest.run_id, manifest.checkpoint_id)
        portal = self._ensure_started()
        portal.call(self._load, manifest, dest, keys)

    async def _load(self, manifest: Manifest, dest: str, keys: CheckpointKeys) -> None:
        who = f"checkpoint {manifest.name!r} ({keys.checkpoint_id})"
        paths = checked_paths([f.path for f in manifest.files], who)

        async def check(i: int, what: str, target: str, digest: str) -> None:
            if digest != manifest.files[i].sha256:
                raise ChecksumMismatchError(
                    f"{what} has SHA-256 {digest}, but its manifest says "
                    f"{manifest.files[i].sha256}. The stored copy is corrupt; load an older "
                    "checkpoint (current.checkpoint.list()) instead.")

        await self._download(dest, who, paths, [
            (keys.stored(f.path, f.key), f.path, f.size) for f in manifest.files], check)

    async def _download(self, dest: str, who: str, paths: list[list[str]],
                        files: Sequence[tuple[str, str, int]],
                        check: Callable[[int, str, str, str], Awaitable[None]],
                        whole: Callable[[], None] = lambda: None) -> None:
        """Download each ``(key, relative path, size)`` of ``files`` into a staging
        directory beside ``dest``, then place them at ``paths`` in ``dest``: all or nothing.

        ``check(i, what, downloaded path, its SHA-256)`` raises for a file that is not what
        was stored (``what`` names it for the message), and ``whole()`` for a set that is
        not; nothing lands in ``dest`` unless both pass for all. Raises
        :class:`~uploader.errors.LoadError` naming ``who``, the file and its key.
        """
        backend = self._backend
        assert backend is not None
        try:
            staging = await anyio.to_thread.run_sync(_load_staging, dest)
        except OSError as e:
            raise LoadError(f"{who}: cannot create a directory in {dest!r} to load into "
                            f"({e}); check that it is writable.") from e

        async def one(i: int) -> None:
            key, rel, size = files[i]
            what = f"{who}: file {rel!r} at {backend.url_of(key)}"
            target = os.path.join(staging, str(i))
            try:
                digest = await backend.get_file(key, target, size)
            except LoadError as e:
                raise type(e)(f"{what}: {e}") from e
            except (CheckpointError, OSError) as e:
                raise LoadError(f"{what} could not be loaded: {e}") from e
            await check(i, what, target, digest)

        try:
            await _each(one, range(len(files)))
            whole()
            try:
                await anyio.to_thread.run_sync(_place, staging, dest, paths, who)
            except OSError as e:
                raise LoadError(f"{who}: cannot place its files in {dest!r}: {e}") from e
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
