"""``from metaflow import load_model``: load a model or checkpoint anywhere.

Imported when ``metaflow`` is: nothing heavy at module level.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["load_model"]


def load_model(reference: Any, path: str | os.PathLike[str], *,
               datastore_root: str | None = None) -> str:
    """Copy a model or checkpoint out of the datastore into ``path``; return the path.

    As ``metaflow-checkpoint``'s ``load_model``: ``reference`` is what
    ``current.model.save()`` or ``current.checkpoint.save()`` returned (an artifact,
    e.g. ``Run("MyFlow/12").data.model``), or its key; references ``metaflow-checkpoint``
    saved load too. Works in a step and anywhere else (a notebook, a script): outside a
    step using ``@model`` or ``@checkpoint`` it reads the default datastore (set
    ``METAFLOW_DEFAULT_DATASTORE`` and ``METAFLOW_DATASTORE_SYSROOT_*`` as the runs had
    them). Files are verified and copied, never linked. A reference saved under another
    datastore root loads only from the root passed as ``datastore_root``.
    """
    from ..shared.exceptions import CheckpointReferenceError

    if reference is None:
        raise CheckpointReferenceError("load_model() needs a reference: what "
                                       "current.model.save() returned, or its key.")
    if path is None:
        raise CheckpointReferenceError("load_model() needs a path to load the model into.")
    dest = os.path.abspath(os.fspath(path))
    from metaflow import current

    for face in ("model", "checkpoint"):
        here = getattr(current, face, None)
        if here is not None:
            return str(here.load(reference, dest, datastore_root=datastore_root))
    from ..checkpoint.api import _reader

    reader = _reader()
    catalog, entry = reader.resolve(reference, datastore_root=datastore_root)
    return str(reader.load(catalog, entry, dest))
