"""Finding and loading checkpoints from anywhere: a task, its subprocesses, a notebook.

A thin adapter over :class:`uploader.catalog.Catalog`: it turns what users hand us (a
reference dict, a manifest key, a task pathspec, a ``metaflow.Task``) into a store and a
manifest, and manifests back into references. References the published
``metaflow-checkpoint`` package wrote go to :mod:`.legacy`, which reads its layout.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

from uploader import CheckpointError, Engine, Settings
from uploader.catalog import Catalog, Entry

from . import legacy
from .exceptions import CheckpointException, CheckpointReferenceError
from .legacy import LegacyEntry
from .reference import CheckpointReference, reference_from_manifest
from .storage import SUPPORTED_DATASTORES, backend_factory

__all__ = ["Reader", "TaskCheckpoints", "default_location"]


def default_location() -> tuple[str, str]:
    """The datastore type and root Metaflow would use here (for notebooks and scripts)."""
    from metaflow import metaflow_config
    from metaflow.plugins import DATASTORES

    ds = metaflow_config.DEFAULT_DATASTORE
    impl = next((d for d in DATASTORES if ds == d.TYPE), None)
    if impl is None:
        raise CheckpointException(f"the default datastore {ds!r} is not available here.")
    root = impl.get_datastore_root_from_config(lambda *a, **k: None, create_on_absent=False)
    if not root:
        raise CheckpointException(
            f"cannot find the {ds} datastore from here; set METAFLOW_DATASTORE_SYSROOT_"
            f"{ds.upper()} or run from the directory the flows ran in.")
    return ds, str(root)


_SCHEMES = {"s3://": "s3", "gs://": "gs", "az://": "azure"}


def _kind_of(root: str) -> str:
    return next((k for s, k in _SCHEMES.items() if root.startswith(s)), "local")


def _same_root(a: str, b: str) -> bool:
    if _kind_of(a) == "azure" or _kind_of(b) == "azure":
        # Metaflow writes an Azure root as container/prefix; a reference as az://...
        return a.removeprefix("az://").rstrip("/") == b.removeprefix("az://").rstrip("/")
    if _kind_of(a) in ("s3", "gs") or _kind_of(b) in ("s3", "gs"):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


class TaskCheckpoints:
    """Where one task's checkpoints are: its scope, run and task id, and its store."""

    def __init__(self, *, scope: str, run_id: str, task_id: str, datastore: str,
                 datastore_root: str, pathspec: str = "", attempt: int | None = None) -> None:
        self.scope, self.run_id, self.task_id = scope, run_id, task_id
        self.datastore, self.datastore_root = datastore, datastore_root
        self.pathspec = pathspec
        self.attempt = attempt  # the task's latest attempt, as Metaflow knows it

    @classmethod
    def of(cls, task: Any) -> TaskCheckpoints | None:
        """For a ``metaflow.Task`` or its pathspec; None if it saved no checkpoints."""
        found = cls.locate(task)
        return found if found.scope else None

    @classmethod
    def locate(cls, task: Any) -> TaskCheckpoints:
        """Where a task's checkpoints would be; ``scope`` is empty if it did not run with
        this package's ``@checkpoint`` (``metaflow-checkpoint``'s may still be there)."""
        from metaflow import Task
        from metaflow.exception import MetaflowNotFound

        try:
            t = task if isinstance(task, Task) else Task(str(task), _namespace_check=False)
            meta = t.metadata_dict
            # A task `resume` cloned ran nothing: its checkpoints are its origin's.
            while t.origin_pathspec and t.origin_pathspec != t.pathspec:
                t = Task(t.origin_pathspec, _namespace_check=False)
                meta = t.metadata_dict
        except MetaflowNotFound as e:
            raise CheckpointReferenceError(f"no such task {task!r}: {e}") from e
        _flow, run_id, _step, task_id = t.pathspec.split("/")
        ds, root = default_location() if "ds-type" not in meta else (
            meta["ds-type"], meta["ds-root"])
        try:
            latest: int | None = int(t.current_attempt)
        except (TypeError, ValueError):
            latest = None
        return cls(scope=meta.get("checkpoint-scope") or "", run_id=run_id, task_id=task_id,
                   datastore=ds, datastore_root=root, pathspec=t.pathspec, attempt=latest)


class Reader:
    """Lists and loads committed checkpoints, keeping one reading engine per store.

    ``home`` is the running task's own engine and store, reused rather than duplicated.
    """

    def __init__(self, *, settings: Settings, log: Callable[[str], None],
                 home: tuple[str, str, Engine] | None = None) -> None:
        self._settings, self._log = settings, log
        self._engines: dict[tuple[str, str], Engine] = {}
        self._owned: list[Engine] = []
        self._home = home
        if home is not None:
            self._engines[(home[0], home[1])] = home[2]
        self._scratch: str | None = None

    def catalog(self, datastore: str, root: str) -> Catalog:
        if (datastore, root) not in self._engines:
            if self._scratch is None:
                # A reader never snapshots, but an engine needs a place for it.
                self._scratch = tempfile.mkdtemp(prefix="metaflow_checkpoint_reader_")
            engine = Engine(backend_factory(datastore, root), self._settings,
                            snapshot_dir=self._scratch, log=self._log)
            self._engines[(datastore, root)] = engine
            self._owned.append(engine)
        return Catalog(self._engines[(datastore, root)])

    def home(self) -> Catalog:
        assert self._home is not None
        return self.catalog(self._home[0], self._home[1])

    def reference(self, catalog: Catalog, entry: Entry) -> CheckpointReference:
        backend = catalog.engine.backend
        return reference_from_manifest(
            entry.manifest, manifest_key=entry.keys.manifest,
            url=backend.url_of(entry.keys.data_prefix), datastore=backend.kind,
            datastore_root=backend.url)

    def list_task(self, task: Any, *, name: str | None = None,
                  attempt: int | str | None = None) -> list[dict[str, Any]]:
        """The committed checkpoints of ``task`` (newest first); [] if it saved none.

        Of its latest attempt by default, as ``metaflow-checkpoint`` lists them; of the
        attempt ``attempt`` names; of every attempt with ``attempt="all"``. Those
        ``metaflow-checkpoint`` saved in it follow ours, marked
        ``"source": "metaflow-checkpoint"``.
        """
        where = TaskCheckpoints.locate(task)
        if attempt == "all":
            attempt = None
        elif attempt is None:
            attempt = where.attempt
        elif not isinstance(attempt, int) or isinstance(attempt, bool):
            raise CheckpointReferenceError(
                f"list(attempt=...) takes an attempt number or 'all', got {attempt!r}.")
        if where.datastore not in SUPPORTED_DATASTORES:
            return []
        catalog = self.catalog(where.datastore, where.datastore_root)
        out: list[dict[str, Any]] = []
        if where.scope:
            out += [self.reference(catalog, e) for e in catalog.select(
                where.scope, run_id=where.run_id, task_id=where.task_id, name=name,
                attempt=attempt)]
        try:
            out += legacy.list_task(catalog.engine, where.pathspec, name=name, attempt=attempt)
        except CheckpointError as e:
            raise CheckpointException(
                f"cannot list the metaflow-checkpoint checkpoints of {where.pathspec}: {e}"
            ) from e
        return out

    def resolve(self, reference: Any, *, default: tuple[str, str] | None = None,
                datastore_root: str | None = None) -> tuple[Catalog, Entry | LegacyEntry]:
        """The committed checkpoint ``reference`` names.

        ``reference`` is a reference dict (from ``save()``, ``list()`` or an artifact), a
        manifest key, a task pathspec (``Flow/run/step/task``: its latest checkpoint) or a
        ``metaflow.Task``. Raises :class:`CheckpointReferenceError` for anything else and
        :class:`CheckpointException` for one that is not committed.

        A reference or key is read from ``default`` (the flow's datastore), or from
        ``datastore_root`` where the caller names one. A reference recording another root
        is refused unless the caller names that root: the dict is data (an artifact, a
        JSON string), and must not on its own point a load at any bucket or directory.
        """
        from metaflow import Task

        explicit = None if datastore_root is None else (_kind_of(datastore_root),
                                                        datastore_root)
        if legacy.recognise(reference) is not None:
            # metaflow-checkpoint's references name no root: like that package, read them
            # from the flow's datastore (or the one the caller names).
            catalog = self.catalog(*(explicit or default or default_location()))
            return catalog, legacy.read(catalog.engine, reference)
        if isinstance(reference, dict) and isinstance(reference.get("key"), str):
            ds = reference.get("datastore")
            root = reference.get("datastore_root")
            home = explicit or default or default_location()
            if ds and root and not (ds == home[0] and _same_root(str(root), home[1])):
                key = reference["key"]
                other = (f"this flow's ({home[1]!r})" if explicit is None
                         else f"the datastore_root={datastore_root!r} passed")
                raise CheckpointReferenceError(
                    f"the checkpoint {key!r} was saved under the datastore root {root!r}, not "
                    f"{other}. A reference alone does not decide where a task reads from; if "
                    f"you trust that root, say so: load(reference, datastore_root={str(root)!r}).")
            return self._read(self.catalog(*home), reference["key"])
        if isinstance(reference, str) and "/manifests/" in reference:
            return self._read(self.catalog(*(explicit or default or default_location())),
                              reference)
        if isinstance(reference, Task) or (isinstance(reference, str)
                                           and reference.count("/") == 3):
            where = TaskCheckpoints.of(reference)
            label = getattr(reference, "pathspec", reference)
            if where is None:
                raise CheckpointReferenceError(
                    f"task {label} has no checkpoints: it did not run with @checkpoint.")
            catalog = self.catalog(where.datastore, where.datastore_root)
            found = catalog.latest(where.scope, run_id=where.run_id, task_id=where.task_id)
            if found is None:
                raise CheckpointReferenceError(f"task {label} committed no checkpoint.")
            return catalog, found
        raise CheckpointReferenceError(
            "load() takes a reference returned by save() or list() (a dict with a 'key'), "
            "its key, a task pathspec 'Flow/run/step/task' or a metaflow.Task (or a reference "
            "metaflow-checkpoint returned, or its key); got "
            f"{reference!r:.200}.")

    def _read(self, catalog: Catalog, key: str) -> tuple[Catalog, Entry]:
        try:
            entry = catalog.read(key)
        except ValueError as e:
            raise CheckpointReferenceError(f"cannot load {key!r}: {e}") from e
        if entry is None:
            raise CheckpointException(
                f"cannot load checkpoint {key!r}: it is not committed in "
                f"{catalog.engine.backend.url}. It may still be uploading (wait for it with "
                "reference.wait()), or it failed.")
        return catalog, entry

    def load(self, catalog: Catalog, entry: Entry | LegacyEntry, path: str) -> str:
        if isinstance(entry, LegacyEntry):
            return legacy.load(catalog.engine, entry, path)
        try:
            catalog.load(entry, path)
        except CheckpointError as e:
            raise CheckpointException(str(e)) from e
        return path

    def close(self) -> None:
        for engine in self._owned:
            engine.close()
        if self._scratch is not None:
            import shutil

            shutil.rmtree(self._scratch, ignore_errors=True)

