"""The reference ``save()`` returns: a plain JSON-able dict that also tracks its upload."""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

from uploader import CheckpointHandle, CheckpointState, Manifest


class CheckpointReference(dict[str, Any]):
    """A dict describing one checkpoint, as ``current.checkpoint.load()`` accepts it.

    Stored as an artifact (``self.ckpt = current.checkpoint.save()``) it pickles as a
    plain dict. While it lives in the task that saved it, it also tracks the upload:
    ``state``, ``done()`` and ``wait()``. Keys read as attributes too
    (``ref.pathspec``), as with the references of the published ``metaflow-checkpoint``.
    """

    _handle: CheckpointHandle | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def state(self) -> str:
        """``pending``, ``uploading``, ``committed``, ``torn`` or ``failed``."""
        if self._handle is None:
            return CheckpointState.COMMITTED.value
        return self._handle.state.value

    def done(self) -> bool:
        return self._handle is None or self._handle.done()

    def to_dict(self) -> dict[str, Any]:
        """A plain dict, as ``info.to_dict()`` of metaflow-checkpoint gives."""
        return dict(self)

    def wait(self, timeout: float | None = None) -> CheckpointReference:
        """Block until this checkpoint is durable; raise if it was torn or failed."""
        if self._handle is not None:
            self._handle.wait(timeout)
        return self


def local_now() -> str:
    """Naive local time in ISO format: how metaflow-checkpoint writes ``created_on``."""
    return datetime.datetime.now().isoformat()


def pathspec_hash(pathspec: str) -> str:
    return hashlib.sha256(json.dumps(pathspec).encode()).hexdigest()[:8]


def reference_fields(*, manifest_key: str, url: str, name: str, pathspec: str, attempt: int,
                     created_on: str, metadata: dict[str, Any], checkpoint_id: str,
                     scope: str, datastore: str, datastore_root: str,
                     size: int | None = None) -> dict[str, Any]:
    return {
        "type": "checkpoint",
        "key": manifest_key,
        "url": url,
        "name": name,
        "pathspec": pathspec,
        "pathspec_hash": pathspec_hash(pathspec),
        "attempt": attempt,
        "created_on": created_on,
        "metadata": metadata,
        "size": size,
        "version_id": checkpoint_id,
        "storage_format": "files",
        "creation_context": "task",
        "scope": scope,
        "datastore": datastore,
        "datastore_root": datastore_root,
    }


def reference_from_manifest(m: Manifest, *, manifest_key: str, url: str, datastore: str,
                            datastore_root: str) -> CheckpointReference:
    ident = m.identity
    return CheckpointReference(reference_fields(
        manifest_key=manifest_key, url=url, name=m.name,
        pathspec=str(ident.get("pathspec", "")), attempt=int(ident.get("attempt", 0)),
        created_on=m.created_on, metadata=m.metadata, checkpoint_id=m.checkpoint_id,
        scope=m.scope_prefix, datastore=datastore, datastore_root=datastore_root,
        size=m.total_bytes,
    ))
