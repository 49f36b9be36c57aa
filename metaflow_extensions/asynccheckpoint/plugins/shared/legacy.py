"""Reading what the published ``metaflow-checkpoint`` package wrote, read-only.

Teams switching to this package keep months of checkpoints and models in that package's
layout, and artifacts holding its references. This module recognises those references,
finds that package's checkpoints for a task or a step, and loads them. It never writes
anything in that layout.

That layout, as ``metaflow-checkpoint`` 0.2.14 writes it under the datastore root
(``checkpoints/checkpoint_storage.py``, ``modeling_utils/model_storage.py``,
``datastore/core.py`` of its source):

- a checkpoint's data under ``<root>/checkpoints/artifacts/<flow>/<step>/<scope>/<task
  identifier>/<pathspec hash>.<attempt>.<name>.<version>``, the reference's ``key``: one
  object per file below it (``storage_format="files"``), or one uncompressed tar
  archive at it (``"tar"``); ``<root>`` is ``mf.checkpoints``;
- its reference, as JSON, at the same path under ``artifact_metadata/`` with a
  ``.metadata`` suffix, and under ``<root>/checkpoints/metadata/<flow>/<run>/<step>/
  <task>/<attempt>.<name>.<version>.metadata``; a ``latest`` object next to each holds
  the reference of the newest checkpoint saved with ``latest=True``, for the scope and
  for the task. The metadata is written after the data: it is that package's commit point.
- ``<scope>`` is the first 12 hex digits of the SHA-256 of the namespace; the task
  identifier those of the SHA-256 of the step name's JSON outside a foreach, and inside
  one of the SHA-256 of the concatenated SHA-256s of each foreach value's JSON (and of a
  fixed entropy string's); see :func:`task_identifier`.
- a model's data at ``mf.models/models/artifacts/<label>_<uuid>`` (a tar archive by
  default, or files below it), its reference at ``mf.models/models/artifact_metadata/
  <label>_<uuid>.metadata``.

There are no checksums in that layout. What can be verified is: the reference agrees
with the metadata stored for it, each stored size (a file's total, or the archive's), and
that an archive holds only regular files and directories inside the destination, each
named once, within bounds on their number and expanded size (see :mod:`.legacy_archive`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

from uploader import CheckpointError, Engine

from . import legacy_archive
from .exceptions import CheckpointException, CheckpointReferenceError

__all__ = ["SOURCE", "LegacyEntry", "latest_for_scope", "latest_for_task", "list_task", "load",
           "read", "recognise", "scope_hash", "task_identifier"]

SOURCE = "metaflow-checkpoint"
"""The ``source`` field of a reference this package read from that package's layout."""

_CKPT = re.compile(r"(?P<root>[^/]+)/checkpoints/artifacts/(?P<flow>[^/]+)/(?P<step>[^/]+)/"
                   r"(?P<scope>[^/]+)/(?P<idf>[^/]+)/(?P<name>[^/]+)")
_MODEL = re.compile(r"(?P<root>[^/]+)/models/artifacts/(?P<uuid>[^/]+)")
_CKPT_ROOT = "mf.checkpoints"
_ARCHIVES = ("tar", "tar.gz", "tgz")
_FORMATS = ("files", *_ARCHIVES)
_HASH_LEN = 12


def _sha(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def scope_hash(namespace: str) -> str:
    """That package's ``<scope>`` component for a namespace."""
    return hashlib.sha256(namespace.encode()).hexdigest()[:_HASH_LEN]


def task_identifier(step: str, foreach_values: list[Any] | None) -> str | None:
    """That package's task identifier; None where a foreach value has no JSON form (it
    could not have stored checkpoints for that branch either)."""
    try:
        if foreach_values is None:
            return _sha(step)[:_HASH_LEN]
        parts = [*foreach_values, _sha("foreach-task-entropy")]
        joined = "".join(_sha(v) for v in parts)
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(joined.encode()).hexdigest()[:_HASH_LEN]


@dataclasses.dataclass(frozen=True)
class LegacyEntry:
    """A checkpoint or model that ``metaflow-checkpoint`` stored, and its stored reference."""

    kind: str  # "checkpoint" or "model"
    key: str
    reference: dict[str, Any]

    @property
    def storage_format(self) -> str:
        return str(self.reference.get("storage_format") or "files")

    @property
    def is_archive(self) -> bool:
        # "tar" is what it writes (uncompressed); a compressed archive reads the same way.
        return self.storage_format in _ARCHIVES

    @property
    def size(self) -> int | None:
        n = self.reference.get("size")
        return n if isinstance(n, int) and not isinstance(n, bool) else None

    @property
    def label(self) -> str:
        return str(self.reference.get("name") or self.reference.get("model_uuid") or self.key)


def _as_mapping(reference: Any) -> Any:
    # A reference's string form: its key, or the JSON of the dict.
    if isinstance(reference, str) and reference.lstrip().startswith("{"):
        try:
            return json.loads(reference)
        except ValueError:
            return reference
    return reference


def recognise(reference: Any) -> str | None:
    """The key of a ``metaflow-checkpoint`` reference (a dict, its JSON, or its key), else
    None."""
    reference = _as_mapping(reference)
    key = reference.get("key") if isinstance(reference, dict) else reference
    if not isinstance(key, str):
        return None
    if _CKPT.fullmatch(key) or _MODEL.fullmatch(key):
        return key
    return None


def _metadata_key(key: str) -> tuple[str, str]:
    m = _CKPT.fullmatch(key)
    if m is not None:
        head = f"{m['root']}/checkpoints/artifact_metadata/{m['flow']}/{m['step']}/{m['scope']}"
        return "checkpoint", f"{head}/{m['idf']}/{m['name']}.metadata"
    m = _MODEL.fullmatch(key)
    if m is not None:
        return "model", f"{m['root']}/models/artifact_metadata/{m['uuid']}.metadata"
    raise CheckpointReferenceError(f"{key!r} is not a metaflow-checkpoint reference key.")


def _parse(data: bytes, where: str) -> dict[str, Any]:
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointException(f"the metaflow-checkpoint metadata at {where} is not JSON "
                                  f"({e}); it cannot be loaded.") from e
    if not isinstance(d, dict):
        raise CheckpointException(f"the metaflow-checkpoint metadata at {where} is not a "
                                  "JSON object; it cannot be loaded.")
    return d


def _marked(reference: dict[str, Any]) -> dict[str, Any]:
    return {**reference, "source": SOURCE}


def read(engine: Engine, reference: Any) -> LegacyEntry:
    """The stored checkpoint or model a ``metaflow-checkpoint`` reference names, checked
    against the metadata that package stored for it."""
    reference = _as_mapping(reference)
    key = recognise(reference)
    if key is None:
        raise CheckpointReferenceError(f"not a metaflow-checkpoint reference: {reference!r:.200}")
    kind, meta_key = _metadata_key(key)
    url = engine.backend.url_of(meta_key)
    try:
        (data,) = engine.read_objects([meta_key])
    except CheckpointError as e:
        raise CheckpointException(f"cannot read the metaflow-checkpoint {kind} {key!r}: {e}") from e
    if data is None:
        raise CheckpointException(
            f"cannot load the metaflow-checkpoint {kind} {key!r}: its metadata ({url}) is not "
            f"in {engine.backend.url}. It was never completed, was deleted, or was saved "
            "under another datastore root.")
    stored = _parse(data, url)
    if stored.get("key") != key or stored.get("type", kind) != kind:
        raise CheckpointException(
            f"the metaflow-checkpoint metadata at {url} describes {stored.get('key')!r} "
            f"(type {stored.get('type')!r}), not the {kind} {key!r}; not loading it.")
    if isinstance(reference, dict):
        for field in ("pathspec", "attempt", "version_id", "model_uuid", "storage_format"):
            if field in reference and field in stored and reference[field] != stored[field]:
                raise CheckpointReferenceError(
                    f"the reference to {key!r} says {field}={reference[field]!r}, but "
                    f"metaflow-checkpoint stored {field}={stored[field]!r} for it; the "
                    "reference was changed or belongs to another object.")
    entry = LegacyEntry(kind, key, _marked(stored))
    if entry.storage_format not in _FORMATS:
        raise CheckpointException(
            f"the metaflow-checkpoint {kind} {key!r} is stored as "
            f"{entry.storage_format!r}; this package reads {', '.join(_FORMATS)}.")
    return entry


def load(engine: Engine, entry: LegacyEntry, dest: str) -> str:
    """Copy ``entry``'s files into ``dest``: all or nothing, sizes checked.

    Any failure is a :class:`CheckpointException` naming the entry's key, and leaves
    ``dest`` as it was (directories this call made for it are removed again).
    """
    who = f"metaflow-checkpoint {entry.kind} {entry.label!r} ({entry.key})"
    made = _missing_dirs(dest)
    try:
        if not entry.is_archive:
            prefix = entry.key + "/"
            keys = sorted(engine.list_keys(prefix))
            if not keys:
                raise CheckpointException(
                    f"{who}: no files are stored under {engine.backend.url_of(prefix)}.")
            engine.fetch([(k, k[len(prefix):], None) for k in keys], dest, who=who,
                         total=entry.size)
        else:
            _load_tar(engine, entry, dest, who)
    except BaseException as e:
        for d in made:
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only if still empty
        if isinstance(e, CheckpointException) or not isinstance(e, Exception):
            raise
        if isinstance(e, CheckpointError):
            raise CheckpointException(str(e) if entry.key in str(e) else f"{who}: {e}") from e
        raise CheckpointException(f"{who}: could not be loaded into {dest!r} "
                                  f"({type(e).__name__}: {e}).") from e
    return dest


def _missing_dirs(dest: str) -> list[str]:
    """``dest`` and those of its parents that do not exist yet, deepest first."""
    out = []
    d = os.path.abspath(dest)
    while not os.path.lexists(d):
        out.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return out


def _load_tar(engine: Engine, entry: LegacyEntry, dest: str, who: str) -> None:
    """Download the archive, unpack it beside ``dest``'s files, and place them: see
    :mod:`.legacy_archive`."""
    try:
        os.makedirs(dest, exist_ok=True)
        # Inside the destination: on its filesystem, so files are renamed into place.
        scratch = tempfile.mkdtemp(prefix=".legacy-load-", dir=dest)
    except OSError as e:
        raise CheckpointException(f"{who}: cannot create a directory in {dest!r} to load "
                                  f"into ({e}); check that it is writable.") from e
    try:
        engine.fetch([(entry.key, "archive.tar", entry.size)], scratch, who=who)
        staging = os.path.join(scratch, "tree")
        os.mkdir(staging)
        paths = legacy_archive.unpack(os.path.join(scratch, "archive.tar"), staging, who)
        legacy_archive.place(staging, dest, paths, who)
    except OSError as e:
        raise CheckpointException(f"{who}: cannot write its files into {dest!r} ({e}); "
                                  "check that it is writable and has space.") from e
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- finding that package's checkpoints --------------------------------------------------

def _newest_first(refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def order(r: dict[str, Any]) -> tuple[int, str, int]:
        attempt, version = r.get("attempt"), r.get("version_id")
        return (attempt if isinstance(attempt, int) else -1, str(r.get("created_on", "")),
                version if isinstance(version, int) else -1)

    return sorted(refs, key=order, reverse=True)


def list_task(engine: Engine, pathspec: str, *, name: str | None = None,
              attempt: int | None = None) -> list[dict[str, Any]]:
    """References of the checkpoints ``metaflow-checkpoint`` saved in a task, newest first,
    each marked ``"source": "metaflow-checkpoint"``."""
    prefix = f"{_CKPT_ROOT}/checkpoints/metadata/{pathspec}/"
    keys = [k for k in engine.list_keys(prefix)
            if k.endswith(".metadata") and "/" not in k[len(prefix):]]
    out = []
    for key, data in zip(keys, engine.read_objects(keys), strict=True):
        if data is None:
            continue
        try:
            ref = _parse(data, engine.backend.url_of(key))
        except CheckpointException as e:
            engine.warn_once(key, f"WARNING: skipping {e}")
            continue
        if ref.get("type", "checkpoint") != "checkpoint" or recognise(ref) is None:
            continue
        if name is not None and ref.get("name") != name:
            continue
        if attempt is not None and str(ref.get("attempt")) != str(attempt):
            continue
        out.append(_marked(ref))
    return _newest_first(out)


def _latest(engine: Engine, key: str) -> LegacyEntry | None:
    (data,) = engine.read_objects([key])
    if data is None:
        return None
    return read(engine, _parse(data, engine.backend.url_of(key)))


def latest_for_task(engine: Engine, pathspec: str) -> LegacyEntry | None:
    """The checkpoint ``metaflow-checkpoint`` would resume a task from (its ``fresh``)."""
    return _latest(engine, f"{_CKPT_ROOT}/checkpoints/metadata/{pathspec}/latest")


def latest_for_scope(engine: Engine, *, flow: str, step: str, namespace: str,
                     identifier: str) -> LegacyEntry | None:
    """The newest checkpoint ``metaflow-checkpoint`` saved for a flow, step, foreach branch
    and namespace (what its ``eager`` loads across runs)."""
    return _latest(engine, f"{_CKPT_ROOT}/checkpoints/artifact_metadata/{flow}/{step}/"
                           f"{scope_hash(namespace)}/{identifier}/latest")
