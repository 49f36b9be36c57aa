"""The engine: snapshot in the caller's thread, upload on one background event loop.

One :class:`Engine` owns one thread running one asyncio loop (through an anyio blocking
portal). ``save()`` snapshots the source in O(files), hands the snapshot to the loop
and returns a :class:`~uploader.handle.CheckpointHandle` at once. At most
``max_pending`` snapshots exist at a time: ``save()`` blocks while that many are being
uploaded. Every request in the loop takes a slot of one shared limiter.

The engine is a facade: the save side is :mod:`.saving`, one checkpoint's upload
:mod:`.pipeline`, the drains :mod:`.drains` and the reading calls :mod:`.reading`. Here
are the loop's lifecycle, the fork reset, and the bridge from the caller's thread.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ..backends.base import Backend, TransferContext
from ..config import Settings
from ..errors import EngineClosedError, ManifestError
from ..handle import CheckpointHandle
from ..layout import CheckpointKeys
from ..manifest import Manifest, checked_paths
from ..retry import RetryPolicy
from ..snapshot import Snapshot
from . import drains, pipeline, reading
from .drains import DrainProgress, DrainReport
from .request import BackendFactory, CommitListener, SaveRequest
from .saving import Saves

__all__ = ["Engine"]

T = TypeVar("T")


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
        self._lock = threading.Lock()
        self._saves = Saves(self.settings, snapshot_dir=self._snapshot_dir, log=self._log,
                            lock=self._lock, on_commit=self._on_commit)
        self._handles = self._saves.handles  # the same list, read without the save side
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None
        self._backend: Backend | None = None
        self._ctx: TransferContext | None = None

    def _forget_parent(self) -> None:
        # Runs in the child right after fork(), single-threaded: the locks, the portal
        # and the handles all belong to the parent (its loop thread was not copied).
        self._forked_from = os.getppid()
        _inherited.append((self._portal_cm, self._portal, self._backend, self._handles))
        self._fresh_state()

    def warn_once(self, topic: str, message: str) -> None:
        """Log ``message`` the first time ``topic`` (a key, a path) comes up in this engine."""
        self._saves.warn_once(topic, message)

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

    def _started(self) -> tuple[BlockingPortal, Backend]:
        portal = self._ensure_started()
        assert self._backend is not None
        return portal, self._backend

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
        self._saves.commit_listeners.append(listener)

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
        # No lock: a list copy is atomic, and a commit listener on the loop thread asks for
        # the handles (commit lines in save order) while a signal handler may be running on
        # the main thread inside save()'s short locked section.
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
        bases = self._saves.bases
        self._ensure_started().call(lambda: bases.offer(keys, manifest, own=False))

    def referenced_keys(self) -> set[str]:
        """Full keys of stored objects that saves of this engine, not yet final, point at
        instead of uploading: a pruner must not remove them. Safe from any thread."""
        return self._saves.refs.all()

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
        portal, backend = self._started()
        return portal.call(self._saves.delete_unreferenced, backend, list(keys))

    def own_prune_marker(self, key: str, live: bool) -> None:
        """Tell the engine that a prune marker (:mod:`uploader.leases`) is this process's
        own (``live``) or is gone; from any thread."""
        self._saves.own_prune_marker(key, live)

    def save(self, request: SaveRequest) -> CheckpointHandle:
        """Snapshot ``request.source`` now and upload it in the background.

        Blocks only while ``max_pending`` earlier snapshots are still pending. Raises
        :class:`~uploader.errors.SnapshotError` in the caller's thread when the source
        cannot be snapshotted; nothing is uploaded then.
        """
        portal, backend = self._started()
        saves = self._saves

        def queue(handle: CheckpointHandle, req: SaveRequest, snap: Snapshot,
                  events: dict[str, object]) -> None:
            portal.start_task_soon(self._upload, saves, handle, req, snap, events)

        return saves.save(request, backend=backend, queue=queue,
                          synchronous=self.synchronous)

    async def _upload(self, saves: Saves, handle: CheckpointHandle, req: SaveRequest,
                      snap: Snapshot, events: dict[str, object]) -> None:
        backend, ctx = self._backend, self._ctx
        assert backend is not None and ctx is not None
        await pipeline.upload(saves, backend, ctx, self._hasher, handle, req, snap, events)

    # -- draining ----------------------------------------------------------------

    def drain(self, timeout: float | None = None, *,
              progress: Callable[[DrainProgress], None] | None = None) -> DrainReport:
        """Wait up to ``timeout`` seconds for every upload: None means the drain timeout
        of the settings, ``math.inf`` until every one is done.

        ``progress`` is called (in the caller's thread) every ``progress_interval`` seconds
        of the settings while uploads are still pending.
        """
        limit = self.settings.drain_timeout if timeout is None else timeout
        return drains.drain(lambda: self.handles, limit, every=self.settings.progress_interval,
                            progress=progress)

    def drain_for_signal(self, timeout: float) -> DrainReport:
        """Like :meth:`drain`, for a signal handler: takes no lock and waits on no event.

        The handler runs on the main thread between two bytecodes of whatever it
        interrupted, which may hold this engine's lock or be inside an event's wait.
        """
        # A list copy is atomic; no lock.
        return drains.drain_for_signal(tuple(self._handles), timeout)

    # -- reading -----------------------------------------------------------------

    def list_manifest_keys(self, prefix: str) -> list[CheckpointKeys]:
        """Committed checkpoints under a scope's ``manifests/`` prefix, newest first."""
        return reading.manifest_keys(self.list_keys(prefix))

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
        written = self._saves.written
        kept = [written.get(k.manifest) if remembered else None for k in keys]
        read = iter(self.read_objects([k.manifest for k, b in zip(keys, kept, strict=True)
                                       if b is None]))
        return reading.manifests_of(next(read) if b is None else b for b in kept)

    def read_objects(self, keys: Sequence[str]) -> list[bytes | None]:
        """The bytes under each of ``keys`` (None where there is none), read concurrently.

        Manifests are read through :meth:`read_manifests`, and checkpoints' data through
        :meth:`load`; this is for the rest (another package's metadata).
        """
        portal, backend = self._started()
        return portal.call(reading.get_all, backend, list(keys))

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
        portal, backend = self._started()
        return portal.call(reading.fetch, backend, list(objects), paths, dest, who, total)

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
        portal, backend = self._started()
        portal.call(reading.load, backend, manifest, dest, keys)
