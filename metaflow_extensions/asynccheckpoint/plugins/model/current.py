"""``current.model``: saving and loading models in a step using ``@model``.

Models go through the same engine as checkpoints (a snapshot in O(files), a background
upload, checksums, the same ``wait`` and the drain at the end of the task), under a tree
of their own (``mf.models/``, see :data:`uploader.layout.MODELS_PREFIX`): a model never
shows up among a step's checkpoints, nor is one resumed from. This module is a thin
adapter: the lifecycle is :class:`CurrentCheckpoint`'s, over a models scope.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from ..checkpoint.current import CurrentCheckpoint
from ..shared.exceptions import CheckpointException, CheckpointReferenceError
from ..shared.reference import CheckpointReference

STORAGE_FORMATS = ("tar", "files")


class ModelException(CheckpointException):
    headline = "@model error"


def _log(msg: str) -> None:
    print(f"[@model] {msg}", file=sys.stderr, flush=True)


class LoadedModels(Mapping[str, "str | None"]):
    """Where each model (or checkpoint) loaded for this step is: ``loaded[name]`` is a path.

    Names are the artifact names given to ``@model(load=...)``, and the keys of the
    references passed to ``current.model.load()``. ``info[name]`` is the reference. A
    reference ``best_effort_load=True`` could not load maps to None.
    """

    def __init__(self) -> None:
        self._paths: dict[str, str | None] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self._temp: list[str] = []

    def __getitem__(self, name: str) -> str | None:
        if name not in self._paths:
            raise KeyError(f"no model named {name!r} was loaded in this step; loaded: "
                           f"{sorted(self._paths) or 'none'}.")
        return self._paths[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def cleanup(self, name: str) -> None:
        """Remove a loaded model's files and forget it (as in ``metaflow-checkpoint``)."""
        path = self[name]
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
            if path in self._temp:
                self._temp.remove(path)
        del self._paths[name]
        self.info.pop(name, None)

    def _cleanup(self) -> None:
        for d in self._temp:
            shutil.rmtree(d, ignore_errors=True)
        self._temp.clear()


class CurrentModel:
    """The model API of a running step: ``current.model``."""

    def __init__(self, *, checkpoints: CurrentCheckpoint, default_label: str,
                 temp_dir_root: str | None) -> None:
        self._store = checkpoints
        self._default_label = default_label
        self._temp_dir_root = temp_dir_root
        self._loaded = LoadedModels()
        self._saved: list[CheckpointReference] = []

    @property
    def loaded(self) -> LoadedModels:
        """The models loaded in this step, by name: ``loaded[name]`` is a directory."""
        return self._loaded

    def save(self, path: str | os.PathLike[str], label: str | None = None,
             metadata: dict[str, Any] | None = None, storage_format: str = "tar", *,
             wait: bool = False) -> CheckpointReference:
        """Save the directory or file at ``path`` as a model; return its reference at once.

        The upload runs behind; ``wait=True`` returns once it is durable. Store the
        reference as an artifact (``self.model = current.model.save(...)``) to load it in
        a later step (``@model(load=["model"])``) or anywhere (``load_model``).
        ``storage_format`` is accepted as in ``metaflow-checkpoint`` ("tar" or "files"); the
        files are stored one by one either way, each with its checksum.
        """
        if path is None:
            raise ModelException("current.model.save() needs the path of a model file or "
                                 "directory.")
        if storage_format not in STORAGE_FORMATS:
            raise ModelException(f"current.model.save(storage_format={storage_format!r}): use "
                                 f"one of {', '.join(map(repr, STORAGE_FORMATS))}.")
        label = self._default_label if label is None else label
        if not isinstance(label, str) or not label:
            raise ModelException(f"current.model.save(label=...) must be a non-empty string, "
                                 f"got {label!r}.")
        # latest=False: a model is never what a retry resumes from.
        ref = self._store.save(path, name=label, metadata=metadata, latest=False, wait=wait)
        # The fields of metaflow-checkpoint's model references, on the same dict the
        # engine completes on commit.
        ref.update({
            "type": "model",
            "label": label,
            "model_uuid": f"{label}_{uuid.uuid4().hex}",
            "serializer": storage_format,
            "source": "task",
            "storage_format": "files",  # what is stored, whatever was asked
        })
        self._saved.append(ref)
        return ref

    def load(self, reference: Any, path: str | None = None, *,
             datastore_root: str | None = None) -> str:
        """Copy a model or checkpoint into ``path`` (default: a new temporary directory) and
        return the path. ``reference``: what ``current.model.save()``,
        ``current.checkpoint.save()`` or ``metaflow-checkpoint`` returned, or its key."""
        if reference is None:
            raise ModelException("current.model.load() needs a reference (an artifact that "
                                 "holds what current.model.save() returned, or its key).")
        dest = self._destination(path, "loaded")
        self._store.load(reference, dest, datastore_root=datastore_root)
        key = str(reference.get("key") if isinstance(reference, dict) else reference)
        self._loaded._paths[key] = dest
        self._loaded.info[key] = dict(reference) if isinstance(reference, dict) else {"key": key}
        return dest

    def wait(self, timeout: float | None = None) -> list[CheckpointReference]:
        """Block until every model saved so far is durable; raise if one could not be."""
        return self._store.wait(timeout)

    @property
    def saved(self) -> list[CheckpointReference]:
        """The references of the models saved in this attempt, in save order."""
        return list(self._saved)

    # -- task lifecycle (called by the decorator) ------------------------------------

    def _load_named(self, flow: Any, load: list[tuple[str, str | None]], *,
                    best_effort: bool, where: str) -> None:
        for name, path in load:
            artifact = getattr(flow, name, None)
            if artifact is None:
                msg = (f"{where}: load names the artifact {name!r}, but self.{name} is not set "
                       "by an earlier step. Set it to what current.model.save() or "
                       "current.checkpoint.save() returned.")
                if not best_effort:
                    raise CheckpointReferenceError(msg)
                _log(f"WARNING: {msg} best_effort_load=True: going on without it.")
                self._loaded._paths[name] = None
                continue
            dest = self._destination(path, name)
            try:
                self._store.load(artifact, dest)
            except CheckpointException as e:
                if not best_effort:
                    raise
                _log(f"WARNING: {where}: could not load self.{name}: {e} "
                     "best_effort_load=True: going on without it.")
                self._loaded._paths[name] = None
                continue
            self._loaded._paths[name] = dest
            self._loaded.info[name] = (dict(artifact) if isinstance(artifact, dict)
                                       else {"key": str(artifact)})
            _log(f"Loaded self.{name} into {dest}.")

    def _destination(self, path: str | None, name: str) -> str:
        if path is not None:
            os.makedirs(path, exist_ok=True)
            return os.path.abspath(path)
        if self._temp_dir_root is not None:
            os.makedirs(self._temp_dir_root, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
        d = tempfile.mkdtemp(prefix=f"metaflow_models_{safe}_", dir=self._temp_dir_root)
        self._loaded._temp.append(d)
        return d

    def _finish(self, *, success: bool, artifacts: Mapping[str, Any] | None = None) -> None:
        self._store._finish(success=success, artifacts=artifacts)

    def _close(self) -> None:
        self._store._close()
        self._loaded._cleanup()
