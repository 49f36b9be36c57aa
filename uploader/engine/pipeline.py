"""One checkpoint's upload, from its snapshot to its manifest, on the engine's loop.

Commit order: data objects, then the manifest (the commit point), then the
``latest.json`` hint. A file whose bytes the scope's newest committed checkpoint already
stored (the same SHA-256, see :mod:`uploader.incremental`) is not uploaded; its entry
points at that object, which is confirmed by the store's checksum of it before the
manifest is written. The save's lease (:mod:`uploader.leases`) is written before the first
byte and renewed for as long as the upload lasts.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import time
from collections.abc import Callable

import anyio
import anyio.to_thread

from ..backends.base import Backend, TransferContext, reporting_progress
from ..errors import CheckpointError, TornCheckpointError, UploadError
from ..handle import CheckpointHandle, CheckpointState
from ..incremental import sha256_file
from ..leases import SaveLease
from ..manifest import FileEntry, Manifest
from ..snapshot import Snapshot, SnapshotFile
from .concurrent import each
from .request import SaveRequest
from .saving import Saves

__all__ = ["TORN_ADVICE", "TORN_WHILE_FROZEN_ADVICE", "CheckpointUpload", "digest", "upload"]

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


def _utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


class _Torn(Exception):
    def __init__(self, file: SnapshotFile) -> None:
        self.file = file


def _naming(e: UploadError, req: SaveRequest, what: str, key: str) -> UploadError:
    """The backend's error, of the same class, prefixed with the checkpoint it broke."""
    cid = req.keys.checkpoint_id
    return type(e)(f"checkpoint {req.name!r} ({cid}), {what}: {e}", checkpoint_id=cid,
                   key=e.key or key)


async def digest(backend: Backend, hasher: Callable[[str], str] | None, f: SnapshotFile) -> str:
    """The SHA-256 of a snapshot file, for the unchanged check: read where the
    backend reads its uploads when it says where (``digest_file``), else in a thread."""
    on_backend = getattr(backend, "digest_file", None)
    if hasher is None and on_backend is not None:
        found: str = await on_backend(f.path, f.size)
        return found
    return await anyio.to_thread.run_sync(hasher or sha256_file, f.path)


async def upload(saves: Saves, backend: Backend, ctx: TransferContext,
                 hasher: Callable[[str], str] | None, handle: CheckpointHandle,
                 req: SaveRequest, snap: Snapshot, events: dict[str, object]) -> None:
    """Upload one snapshot and commit it, its lease renewed meanwhile; the handle ends
    final (committed, torn or failed) and the snapshot and its slot are released."""
    lease = SaveLease(backend, req.keys)

    def warn(msg: str) -> None:
        saves.warn_once(f"lease:{req.keys.scope_prefix}", f"WARNING: {msg}")

    # The lease is renewed for as long as the upload lasts (uploader.leases).
    async with anyio.create_task_group() as tg:
        tg.start_soon(lease.keep_alive, warn)
        try:
            await CheckpointUpload(saves, backend, ctx, hasher, handle, req, snap, events,
                                   lease).run()
        finally:
            tg.cancel_scope.cancel()


class CheckpointUpload:
    """The state of one upload: the files' entries as they are uploaded or found
    unchanged, the base they may point into, and the handle whose stats they move."""

    def __init__(self, saves: Saves, backend: Backend, ctx: TransferContext,
                 hasher: Callable[[str], str] | None, handle: CheckpointHandle,
                 req: SaveRequest, snap: Snapshot, events: dict[str, object],
                 lease: SaveLease) -> None:
        self.saves, self.backend, self.ctx, self.hasher = saves, backend, ctx, hasher
        self.handle, self.req, self.snap, self.events, self.lease = (handle, req, snap, events,
                                                                     lease)
        self.keys = req.keys
        self.stats = handle.stats
        self.t0 = time.monotonic()
        self.entries: dict[str, FileEntry] = {}
        # The newest committed checkpoint of the scope as this upload starts: files that
        # hold the same bytes point at its objects instead of being uploaded again.
        self.base = (saves.bases.get(self.keys.scope_prefix) if saves.settings.incremental
                     else None)

    # -- one file ------------------------------------------------------------------

    def _check(self, f: SnapshotFile) -> None:
        # One rule for every freeze (see snapshot.py): a link now, the rest as made.
        if not self.saves.rewrites.unchanged(f, self.events):
            raise _Torn(f)

    async def _unchanged(self, f: SnapshotFile) -> FileEntry | None:
        """An entry pointing at the base's object if ``f`` holds the same bytes."""
        base = self.base
        old = None if base is None else base.candidate(f.relpath, f.size)
        if base is None or old is None:
            return None
        if f.data is not None:  # a small file save() read into memory
            sha = hashlib.sha256(f.data).hexdigest()
        else:
            self._check(f)
            try:
                async with self.ctx.limiter:  # bounds open files and buffers, as uploads do
                    sha = await digest(self.backend, self.hasher, f)
            except OSError:
                self._check(f)
                return None  # the upload reads it again, and explains what is wrong
        # As after an upload: bytes read from a file rewritten meanwhile commit nothing.
        self._check(f)
        if sha != old.sha256:
            return None
        origin = base.origin(old)
        # Before it is confirmed and committed, so a pruner leaves the object alone.
        self.saves.refs.add(self.keys.checkpoint_id, self.keys.stored(f.relpath, origin))
        return FileEntry(f.relpath, f.size, sha, origin)

    @staticmethod
    def _frozen_whole(f: SnapshotFile) -> None:
        # A file torn as it was frozen fails the checkpoint before any upload. A linked
        # one is compared after it is read: a read that fails (its permissions changed)
        # says so, rather than calling the file rewritten.
        if not f.whole:
            raise _Torn(f)

    async def _one(self, f: SnapshotFile) -> None:
        self._frozen_whole(f)
        entry = await self._unchanged(f)
        if entry is None:
            await self._upload(f)
            return
        self.entries[f.relpath] = entry
        self.stats.files_skipped += 1
        self.stats.bytes_skipped += f.size

    async def _confirm(self, f: SnapshotFile) -> None:
        # The object may have been removed or changed since the base was committed (a
        # pruner, a lifecycle rule, a person, another tool): then this file is
        # uploaded after all. By the store's checksum, never by size alone, so a
        # same-size corruption never spreads to later checkpoints.
        keys, backend = self.keys, self.backend
        entry = self.entries[f.relpath]
        key = keys.stored(f.relpath, entry.key)
        try:
            why = await backend.confirm(key, f.size, entry.sha256,
                                        f.path if f.data is None else f.data)
        except CheckpointError as e:
            why = f"it could not be looked at ({e})"
        if why is None:
            return
        self.saves.log(f"note: checkpoint {self.req.name!r} ({keys.checkpoint_id}): "
                       f"{f.relpath!r} is unchanged, but the stored copy at "
                       f"{backend.url_of(key)} that it would point at is not usable ({why}); "
                       "uploading it again.")
        self.stats.files_skipped -= 1
        self.stats.bytes_skipped -= f.size
        await self._upload(f)

    async def _upload(self, f: SnapshotFile) -> None:
        self._frozen_whole(f)
        keys, backend, req = self.keys, self.backend, self.req
        key = keys.data(f.relpath)
        counted = 0  # of this file's bytes, counted in the stats as the store took them

        def count(n: int) -> None:
            # Parts (blocks, chunks) as they are stored: the drain's progress moves during
            # one big file. At most the file's size: a lost session may send bytes again.
            nonlocal counted
            n = min(n, f.size - counted)
            counted += n
            self.stats.bytes_uploaded += n

        try:
            try:
                if f.data is not None:
                    await backend.put_bytes(key, f.data)
                    sha = hashlib.sha256(f.data).hexdigest()
                else:
                    with reporting_progress(count):
                        sha = await backend.put_file(key, f.path, f.size)
            except BaseException:
                self.stats.bytes_uploaded -= counted  # a failed file counts for nothing
                raise
        except UploadError as e:
            raise _naming(e, req, f"file {f.relpath!r}", key) from e
        except CheckpointError:
            raise
        except Exception as e:
            self._check(f)  # a file truncated under the reader is a torn file, not a failure
            raise UploadError(
                f"checkpoint {req.name!r} ({keys.checkpoint_id}): uploading {f.relpath!r} "
                f"to {backend.url_of(key)} failed: {e}",
                checkpoint_id=keys.checkpoint_id, key=key) from e
        self._check(f)
        self.entries[f.relpath] = FileEntry(f.relpath, f.size, sha)
        self.stats.bytes_uploaded += f.size - counted  # what the store did not report

    def _unpoint(self, f: SnapshotFile) -> None:
        # An unchanged file that is uploaded after all.
        self.stats.files_skipped -= 1
        self.stats.bytes_skipped -= f.size

    async def _reconfirm(self, f: SnapshotFile) -> None:
        # This save's own object, which a prune may have taken for debris while the
        # lease could not be renewed: uploaded again if it is not there whole.
        keys, backend = self.keys, self.backend
        entry = self.entries[f.relpath]
        key = keys.data(f.relpath)
        try:
            why = await backend.confirm(key, f.size, entry.sha256,
                                        f.path if f.data is None else f.data)
        except CheckpointError as e:
            why = f"it could not be looked at ({e})"
        if why is not None:
            self.saves.log(f"note: checkpoint {self.req.name!r} ({keys.checkpoint_id}): the "
                           f"uploaded {f.relpath!r} at {backend.url_of(key)} is not usable "
                           f"({why}); uploading it again.")
            self.stats.bytes_uploaded -= f.size
            await self._upload(f)

    # -- the manifest ----------------------------------------------------------------

    def _build(self) -> Manifest:
        keys, req, snap = self.keys, self.req, self.snap
        return Manifest(
            checkpoint_id=keys.checkpoint_id, name=req.name, run_id=keys.run_id,
            scope_prefix=keys.scope_prefix,
            created_on=req.reference.get("created_on", ""),
            committed_on=_utcnow(), latest=req.latest,
            files=tuple(self.entries[f.relpath] for f in snap.files),
            metadata=req.metadata, identity=req.identity,
            source="file" if os.path.isfile(req.source) else "directory",
            timings={"snapshot_s": snap.seconds, "upload_s": time.monotonic() - self.t0},
            bytes_skipped=self.stats.bytes_skipped,
        )

    async def _write_manifest(self, manifest: Manifest) -> None:
        keys = self.keys
        data = manifest.to_json()
        try:
            await self.backend.put_bytes(keys.manifest, data)
        except UploadError as e:
            raise _naming(e, self.req, "writing its manifest", keys.manifest) from e
        self.saves.written.put(keys.manifest, data)

    async def _missing(self, files: list[SnapshotFile]) -> list[SnapshotFile]:
        # One listing per checkpoint pointed into, not a request per file.
        keys = self.keys
        where = {f.relpath: keys.stored(f.relpath, self.entries[f.relpath].key)
                 for f in files}
        head = f"{keys.scope_prefix}/data/"
        prefixes = {head + "/".join(k[len(head):].split("/", 2)[:2]) + "/"
                    for k in where.values()}
        found: set[str] = set()

        async def look(prefix: str) -> None:
            found.update(await self.backend.list_keys(prefix))

        await each(look, prefixes)
        return [f for f in files if where[f.relpath] not in found]

    # -- the whole checkpoint --------------------------------------------------------

    async def _commit(self) -> None:
        saves, backend, lease = self.saves, self.backend, self.lease
        keys, req, snap, handle, entries = self.keys, self.req, self.snap, self.handle, \
            self.entries
        handle._transition(CheckpointState.UPLOADING)
        try:
            # Before the first byte of data: a prune anywhere spares what it covers.
            await lease.write()
        except UploadError as e:
            raise _naming(e, req, "writing its lease", lease.key) from e
        await each(self._one, snap.files)
        pointing = [f for f in snap.files if entries[f.relpath].key is not None]
        if pointing:
            # Rule 2 of uploader.leases: say what it points at, then let the prunes
            # of other processes end before checking that those objects exist.
            await lease.write([keys.stored(f.relpath, entries[f.relpath].key)
                               for f in pointing])
            if not await lease.await_prunes(lambda: saves.own_markers):
                saves.log(f"note: checkpoint {req.name!r} ({keys.checkpoint_id}): a "
                          "prune of another process is still running in its scope, so "
                          f"its {len(pointing)} unchanged file(s) are uploaded rather "
                          "than pointed at.")
                for f in pointing:
                    self._unpoint(f)
                await each(self._upload, pointing)
                pointing = []
        if lease.lapsed:
            await lease.write()
            await lease.await_prunes(lambda: saves.own_markers)
            await each(self._reconfirm, [f for f in snap.files
                                         if entries[f.relpath].key is None])
        # Until the manifest is written, no deletion through this engine runs between
        # the check that those objects exist and the commit (delete_unreferenced).
        guard = saves.pointing_lock() if pointing else contextlib.nullcontext()
        async with guard:
            await each(self._confirm, pointing)
            manifest = self._build()
            await self._write_manifest(manifest)
        # What it points at is looked at once more: the protocol makes a deletion
        # here impossible for every pruner that follows it, but not for a person or a
        # lifecycle rule. Whatever went is uploaded and the manifest written again.
        pointing = [f for f in pointing if entries[f.relpath].key is not None]
        gone = await self._missing(pointing) if pointing else []
        if gone and await backend.stat(keys.manifest) is None:
            gone = []  # pruned already, with what it pointed at: nothing to mend
        if gone:
            first = keys.stored(gone[0].relpath, entries[gone[0].relpath].key)
            saves.log(f"WARNING: checkpoint {req.name!r} ({keys.checkpoint_id}): "
                      f"{len(gone)} object(s) it points at were deleted as it committed "
                      f"(e.g. {backend.url_of(first)}), not by a prune of this "
                      "package; uploading those files and writing the manifest again.")
            try:
                for f in gone:
                    self._unpoint(f)
                await each(self._upload, gone)
                manifest = self._build()
                await self._write_manifest(manifest)
            except BaseException:
                saves.written.forget([keys.manifest])
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await backend.delete_keys([keys.manifest])
                raise
        req.reference["size"] = manifest.total_bytes
        if req.latest:
            # Before the handle completes, so whoever waits on it sees the hint too;
            # shielded, since the checkpoint is already committed by its manifest.
            with anyio.move_on_after(30, shield=True):
                await saves.write_latest_hint(backend, keys)
        saves.bases.offer(keys, manifest, own=True)
        handle._transition(CheckpointState.COMMITTED,
                           before_done=lambda: saves.committed(handle))

    async def run(self) -> None:
        """Upload and commit; the handle ends final whatever happens."""
        saves, keys, req, handle = self.saves, self.keys, self.req, self.handle
        try:
            await self._commit()
        except _Torn as t:
            # Freeze this path privately from now on: at most this checkpoint is lost.
            saves.rewrites.torn(t.file)
            newer = saves.has_newer(handle)
            when, advice = (("while its upload was pending", TORN_ADVICE) if t.file.shared
                            else ("while save() froze it", TORN_WHILE_FROZEN_ADVICE))
            msg = (f"checkpoint {req.name!r} ({keys.checkpoint_id}) was not committed: "
                   f"{t.file.relpath!r} was rewritten in place {when}. ")
            handle._transition(CheckpointState.TORN, TornCheckpointError(
                msg + advice, checkpoint_id=keys.checkpoint_id, path=t.file.relpath))
            if newer:
                saves.note_superseded(handle)
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
            saves.log(f"ERROR: {e}")
        except Exception as e:
            err = UploadError(f"checkpoint {req.name!r} ({keys.checkpoint_id}) failed: "
                              f"{type(e).__name__}: {e}", checkpoint_id=keys.checkpoint_id)
            handle._transition(CheckpointState.FAILED, err)
            saves.log(f"ERROR: {err}")
        finally:
            saves.refs.drop(keys.checkpoint_id)
            with anyio.CancelScope(shield=True):
                saves.rewrites.released(self.snap)
                await anyio.to_thread.run_sync(self.snap.release)
            saves.slots.release()
            # Last: the snapshot and the pending slot are not held while the store answers.
            if self.lease.written is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(30), \
                        contextlib.suppress(Exception):
                    await self.lease.release()  # else it expires
