"""``current.checkpoint``: what a step using ``@checkpoint`` talks to."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

from uploader import (
    CheckpointError,
    CheckpointHandle,
    CheckpointKeys,
    CheckpointState,
    Engine,
    Manifest,
    SaveRequest,
    Scope,
    Settings,
    new_checkpoint_id,
)
from uploader.engine import _utcnow

from .exceptions import CheckpointException, CheckpointUploadException
from .reference import CheckpointReference, reference_fields, reference_from_manifest
from .storage import backend_factory

DEFAULT_NAME = "mfchckpt"


def _holders(key: Any, artifacts: Mapping[str, Any]) -> list[str]:
    """Names of artifacts that hold the reference with ``key`` (directly or one level in)."""

    def holds(value: Any) -> bool:
        return isinstance(value, dict) and value.get("key") == key

    out = []
    for name, value in artifacts.items():
        inner = value.values() if isinstance(value, dict) and not holds(value) else \
            value if isinstance(value, list | tuple) else ()
        if holds(value) or any(holds(v) for v in inner):
            out.append(f"self.{name}")
    return out


def _log(msg: str) -> None:
    print(f"[@checkpoint] {msg}", file=sys.stderr, flush=True)


class TaskIdentity:
    def __init__(self, *, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                 namespace: str) -> None:
        self.flow, self.run_id, self.step = flow, run_id, step
        self.task_id, self.attempt, self.namespace = task_id, attempt, namespace

    @property
    def pathspec(self) -> str:
        return f"{self.flow}/{self.run_id}/{self.step}/{self.task_id}"

    def as_dict(self) -> dict[str, Any]:
        return {"flow": self.flow, "run_id": self.run_id, "step": self.step,
                "task_id": self.task_id, "attempt": self.attempt, "namespace": self.namespace,
                "pathspec": self.pathspec, "host": socket.gethostname(), "pid": os.getpid()}


class CurrentCheckpoint:
    """The checkpoint API of a running step: ``current.checkpoint``."""

    def __init__(self, *, identity: TaskIdentity, scope: Scope, settings: Settings,
                 datastore: str, datastore_root: str, temp_dir_root: str | None,
                 log: Callable[[str], None] = _log) -> None:
        import tempfile

        self._identity = identity
        self._scope = scope
        self._datastore = datastore
        self._datastore_root = datastore_root
        self._log = log
        if temp_dir_root is not None:
            os.makedirs(temp_dir_root, exist_ok=True)
        self._directory = tempfile.mkdtemp(prefix="metaflow_checkpoint_", dir=temp_dir_root)
        # Snapshots sit next to the staging directory, on the same filesystem, so they can
        # be hardlinks.
        self._snapshot_dir = tempfile.mkdtemp(prefix="metaflow_checkpoint_snapshots_",
                                              dir=os.path.dirname(self._directory))
        self._engine = Engine(backend_factory(datastore, datastore_root), settings,
                              snapshot_dir=self._snapshot_dir, log=log)
        self._readers: dict[tuple[str, str], Engine] = {}
        self._loaded: CheckpointReference | None = None
        self._told_tar = False

    # -- the published surface ----------------------------------------------------

    @property
    def directory(self) -> str:
        """The staging directory: write checkpoint files here, then call ``save()``."""
        return self._directory

    @property
    def is_loaded(self) -> bool:
        """True when a checkpoint was loaded into ``directory`` as the task started."""
        return self._loaded is not None

    @property
    def info(self) -> CheckpointReference | None:
        """The reference of the checkpoint loaded as the task started, else None."""
        return self._loaded

    def save(
        self,
        path: str | os.PathLike[str] | None = None,
        name: str | None = DEFAULT_NAME,
        metadata: dict[str, Any] | None = None,
        latest: bool = True,
        storage_format: str = "files",
        *,
        wait: bool = False,
    ) -> CheckpointReference:
        """Snapshot ``path`` (default: ``directory``) and upload it in the background.

        Returns at once with a reference (a dict) that can be stored as an artifact and
        passed to ``load()``. With ``wait=True``, returns only once the checkpoint is
        durable, and raises if it could not be stored. ``latest=False`` keeps this
        checkpoint from being the one a retry resumes from.
        """
        name = DEFAULT_NAME if name is None else name
        self._check_save_args(name, metadata, latest, storage_format)
        source = os.path.abspath(os.fspath(path)) if path is not None else self._directory
        ident = self._identity
        cid = new_checkpoint_id(ident.task_id, ident.attempt)
        keys = CheckpointKeys(self._scope.prefix, ident.run_id, cid)
        backend = self._engine.backend
        ref = CheckpointReference(reference_fields(
            manifest_key=keys.manifest, url=backend.url_of(keys.data_prefix), name=name,
            pathspec=ident.pathspec, attempt=ident.attempt, created_on=_utcnow(),
            metadata=dict(metadata or {}), checkpoint_id=cid, scope=self._scope.prefix,
            datastore=self._datastore, datastore_root=self._datastore_root,
        ))
        try:
            handle = self._engine.save(SaveRequest(
                source=source, keys=keys, name=name, latest=latest,
                metadata=dict(metadata or {}), identity=ident.as_dict(), reference=ref,
            ))
        except CheckpointError as e:
            raise CheckpointException(str(e)) from e
        ref._handle = handle
        if wait or self._engine.synchronous:
            # In a forked child nothing drains at exit: its saves finish before returning.
            self._wait_one(handle)
        return ref

    def wait(self, timeout: float | None = None) -> list[CheckpointReference]:
        """Block until every save so far is durable; raise if the newest could not be.

        A torn checkpoint that a later save superseded is not an error here.
        """
        report = self._engine.drain(timeout)
        if report.pending:
            raise CheckpointUploadException(
                "%d checkpoint(s) still uploading after %ss" % (len(report.pending), timeout))
        errors = [str(h.error) for h in report.failed + report.torn_unsuperseded]
        if errors:
            raise CheckpointUploadException("\n".join(errors))
        return [h.reference for h in report.committed
                if isinstance(h.reference, CheckpointReference)]

    def list(
        self,
        name: str | None = None,
        task: Any = None,
        attempt: int | None = None,
        full_namespace: bool = False,
    ) -> list[CheckpointReference]:
        """Committed checkpoints, newest first.

        Without ``task``: those of this task, every attempt. With ``task`` (a pathspec or
        a ``metaflow.Task``): those of that task. ``full_namespace=True`` lists every run
        of this step and foreach branch in this namespace.
        """
        if task is not None:
            scope_prefix, run_id, task_id = self._scope_of_task(task)
        else:
            scope_prefix, run_id, task_id = self._scope.prefix, self._identity.run_id, \
                self._identity.task_id
        if full_namespace:
            run_id = task_id = None  # type: ignore[assignment]
        manifests = self._manifests(self._engine, scope_prefix, run_id)
        out = []
        for key, m in manifests:
            if task_id is not None and str(m.identity.get("task_id")) != str(task_id):
                continue
            if name is not None and m.name != name:
                continue
            if attempt is not None and int(m.identity.get("attempt", -1)) != int(attempt):
                continue
            out.append(self._ref(self._engine, key, m))
        return out

    def load(self, reference: dict[str, Any] | str, path: str | None = None) -> str:
        """Copy a checkpoint's files into ``path`` (default: a cleared ``directory``).

        ``reference`` is what ``save()`` or ``list()`` returned (possibly read back from
        an artifact, in a later step or run), or its ``key``. Files are copied out of
        the datastore, never linked, and verified against their checksums.
        """
        engine, key = self._resolve_reference(reference)
        try:
            manifest = engine.read_manifest(CheckpointKeys.from_manifest_key(key))
        except ValueError as e:
            raise CheckpointException(f"cannot load {reference!r}: {e}") from e
        if manifest is None:
            raise CheckpointException(
                f"cannot load checkpoint {key!r}: it is not committed in {engine.backend.url}. "
                "It may still be uploading (wait for it with reference.wait()), or it failed.")
        if path is None:
            path = self._directory
            self._clear_directory()
        try:
            engine.load(manifest, path)
        except CheckpointError as e:
            raise CheckpointException(str(e)) from e
        return path

    # -- task lifecycle (called by the decorator) ------------------------------------

    def _load_on_start(self, policy: str) -> None:
        self._engine.backend  # noqa: B018  start the uploader now, not in the first save()
        if policy == "none":
            return
        found = self._latest(run_id=self._identity.run_id, task_id=self._identity.task_id)
        if found is None and policy == "eager":
            found = self._latest(run_id=None, task_id=None)
        if found is None:
            return
        key, manifest = found
        self._engine.load(manifest, self._directory)
        self._loaded = self._ref(self._engine, key, manifest)
        self._log(f"Loaded checkpoint {manifest.name!r} saved by {self._loaded['pathspec']} "
                  f"(attempt {self._loaded['attempt']}, {manifest.created_on}), "
                  f"{len(manifest.files)} file(s), {manifest.total_bytes} bytes.")

    def _finish(self, *, success: bool, artifacts: Mapping[str, Any] | None = None) -> None:
        """Drain pending uploads. On success, raise if a checkpoint failed for good.

        A torn checkpoint that no later save of its name replaced fails a successful
        step, naming the artifact that holds its reference. The one exception is the
        default name, whose content is "the step's latest state": its newest save is
        taken again now that the step has returned and nothing can change the files.
        A name the user chose ("best") is never given content other than what was saved.
        """
        report = self._engine.drain()
        if success:
            defaults = [h for h in report.handles if h.name == DEFAULT_NAME]
            newest = defaults[-1] if defaults else None
            if newest is not None and newest.state is CheckpointState.TORN:
                self._log(f"ERROR: the newest checkpoint {newest.name!r} was torn; saving "
                          f"{newest.source} again now that the step has finished.")
                ref = newest.reference
                try:
                    self.save(newest.source, name=newest.name, metadata=ref.get("metadata"),
                              latest=True, wait=True)
                except CheckpointException as e:
                    self._log(f"ERROR: saving again failed: {e}")
                report = self._engine.drain()
        problems: list[str] = []
        if report.pending:
            problems.append(
                "%d checkpoint(s) were still uploading after METAFLOW_CHECKPOINT_DRAIN_TIMEOUT="
                "%ss and were abandoned: %s" % (
                    len(report.pending), self._engine.settings.drain_timeout,
                    ", ".join(f"{h.name!r} ({h.checkpoint_id})" for h in report.pending)))
        problems += [str(h.error) for h in report.failed]
        for h in report.torn_unsuperseded:
            held = _holders(h.reference.get("key"), artifacts or {})
            problems.append(
                f"{h.error} No later save named {h.name!r} was committed to replace it"
                + (f"; the artifact(s) {', '.join(held)} hold its reference, which no "
                   "reader can load" if held else "") + ".")
        committed = len(report.committed)
        if report.handles:
            self._log(f"{committed} of {len(report.handles)} checkpoint(s) of this attempt "
                      "committed.")
        if problems:
            text = "\n".join(problems)
            if success:
                raise CheckpointUploadException(text)
            self._log("ERROR: " + text)

    def _drain_for_signal(self, grace: float) -> None:
        """Commit what is pending within ``grace`` seconds; safe inside a signal handler."""
        report = self._engine.drain_for_signal(grace)
        if report.pending:
            self._log(
                "ERROR: %d checkpoint(s) were still uploading after "
                "METAFLOW_CHECKPOINT_SIGTERM_GRACE=%gs and are lost: %s. Raise it if the "
                "platform allows that long between SIGTERM and SIGKILL." % (
                    len(report.pending), grace,
                    ", ".join(f"{h.name!r} ({h.checkpoint_id})" for h in report.pending)))
        for h in report.failed + report.torn_unsuperseded:
            self._log(f"ERROR: {h.error}")
        if report.handles:
            self._log(f"SIGTERM: {len(report.committed)} of {len(report.handles)} "
                      "checkpoint(s) of this attempt committed.")

    def _remove_files(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)
        shutil.rmtree(self._snapshot_dir, ignore_errors=True)

    def _close(self) -> None:
        self._engine.close()
        for e in self._readers.values():
            e.close()
        self._remove_files()

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def _check_save_args(name: Any, metadata: Any, latest: Any, storage_format: Any) -> None:
        if not isinstance(name, str) or not name:
            raise CheckpointException(f"save(name=...) must be a non-empty string, got {name!r}.")
        if metadata is not None and not isinstance(metadata, dict):
            raise CheckpointException(
                f"save(metadata=...) must be a dict, got {type(metadata).__name__}.")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            # Checked here, in the caller's thread: the manifest that records it is only
            # written once the upload is done, far from the line that passed it.
            raise CheckpointException(
                f"save(metadata=...) must be JSON-serialisable (str, numbers, bools, None, "
                f"lists and dicts of them): {e}. Convert values such as numpy scalars with "
                "float() or int().") from e
        if not isinstance(latest, bool):
            raise CheckpointException(f"save(latest=...) must be True or False, got {latest!r}.")
        if storage_format not in ("files", "tar"):
            raise CheckpointException(
                f"save(storage_format=...) must be 'files' or 'tar', got {storage_format!r}.")

    def _wait_one(self, handle: CheckpointHandle) -> None:
        try:
            handle.wait()
        except CheckpointError as e:
            raise CheckpointUploadException(str(e)) from e

    def _clear_directory(self) -> None:
        for entry in os.scandir(self._directory):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    def _manifests(self, engine: Engine, scope_prefix: str,
                   run_id: str | None) -> list[tuple[str, Manifest]]:
        scope = Scope.from_prefix(scope_prefix)
        out = []
        for keys in engine.list_manifest_keys(scope.manifests_prefix(run_id)):
            m = engine.read_manifest(keys)
            if m is not None:
                out.append((keys.manifest, m))
        return out

    def _latest(self, *, run_id: str | None, task_id: str | None) -> tuple[str, Manifest] | None:
        scope = self._scope
        # The listing is newest first by attempt and save order, not by the hosts' clocks,
        # so the first match is the one to resume from.
        for keys in self._engine.list_manifest_keys(scope.manifests_prefix(run_id)):
            m = self._engine.read_manifest(keys)
            if m is None or not m.latest:
                continue
            if task_id is not None and str(m.identity.get("task_id")) != str(task_id):
                continue
            return keys.manifest, m
        return None

    def _ref(self, engine: Engine, key: str, m: Manifest) -> CheckpointReference:
        keys = CheckpointKeys.from_manifest_key(key)
        return reference_from_manifest(
            m, manifest_key=key, url=engine.backend.url_of(keys.data_prefix),
            datastore=engine.backend.kind, datastore_root=engine.backend.url)

    def _engine_for(self, datastore: str, root: str) -> Engine:
        if (datastore, root) == (self._datastore, self._datastore_root):
            return self._engine
        if (datastore, root) not in self._readers:
            self._readers[(datastore, root)] = Engine(
                backend_factory(datastore, root), self._engine.settings,
                snapshot_dir=self._snapshot_dir, log=self._log)
        return self._readers[(datastore, root)]

    def _resolve_reference(self, reference: dict[str, Any] | str) -> tuple[Engine, str]:
        if isinstance(reference, str):
            return self._engine, reference
        if isinstance(reference, dict) and isinstance(reference.get("key"), str):
            ds = reference.get("datastore") or self._datastore
            root = reference.get("datastore_root") or self._datastore_root
            return self._engine_for(str(ds), str(root)), reference["key"]
        raise CheckpointException(
            f"load() takes a reference returned by save() or list() (a dict with a 'key'), "
            f"or that key as a string; got {type(reference).__name__}.")

    def _scope_of_task(self, task: Any) -> tuple[str, str, str]:
        from metaflow import Task

        t = task if isinstance(task, Task) else Task(str(task), _namespace_check=False)
        scope = t.metadata_dict.get("checkpoint-scope")
        if not scope:
            raise CheckpointException(
                f"task {t.pathspec} has no checkpoints: it did not run with @checkpoint.")
        _flow, run_id, _step, task_id = t.pathspec.split("/")
        return scope, run_id, task_id


__all__ = ["CheckpointState", "CurrentCheckpoint", "TaskIdentity"]
