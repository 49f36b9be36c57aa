"""What part of a store holds: its scopes, and data no manifest commits.

:class:`~uploader.catalog.Catalog` reads one scope. Tools that look at a whole flow or
namespace (the command line, retention) first need the scopes under a prefix, and the
data prefixes that have no manifest: the debris of an upload that crashed, or one still
in flight. One listing of the prefix answers both. Keys that do not fit the layout
(:mod:`uploader.layout`) are ignored, so a stray object never stops a listing.
"""

from __future__ import annotations

import dataclasses

from .backends.base import StoredObject
from .engine import Engine
from .layout import ROOT_PREFIX, CheckpointKeys, Scope

__all__ = ["Inventory", "Uncommitted", "take_inventory"]

# ROOT/flow/namespace/step/foreach: the components of a scope prefix.
_SCOPE_PARTS = 5


@dataclasses.dataclass(frozen=True)
class Uncommitted:
    """Data stored for a checkpoint whose manifest is not there (yet, or ever)."""

    keys: CheckpointKeys  # where its manifest would be
    objects: tuple[StoredObject, ...]  # its data, sorted by key

    @property
    def size(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def mtime(self) -> float:
        """When its newest object was written, by the store's clock."""
        return max(o.mtime for o in self.objects)


@dataclasses.dataclass(frozen=True)
class Inventory:
    prefix: str
    scopes: tuple[str, ...]  # scope prefixes, sorted
    manifests: tuple[CheckpointKeys, ...]  # newest first
    uncommitted: tuple[Uncommitted, ...]  # newest first


def take_inventory(engine: Engine, prefix: str) -> Inventory:
    """The scopes, manifests and uncommitted data under ``prefix``, from one listing.

    ``prefix`` is any prefix of the layout ending in "/" (``mf.checkpoints/<flow>/``, a
    namespace, a scope); the listing is of every object below it, data included.
    """
    if not (prefix == ROOT_PREFIX + "/" or prefix.startswith(ROOT_PREFIX + "/")):
        raise ValueError(f"not a checkpoint prefix: {prefix!r}")
    scopes: set[str] = set()
    manifests: set[CheckpointKeys] = set()
    data: dict[CheckpointKeys, list[StoredObject]] = {}
    for obj in engine.run(engine.backend.list_objects, prefix):
        parts = obj.key.split("/")
        if len(parts) < _SCOPE_PARTS + 1 or any(p in ("", ".", "..") for p in parts):
            continue
        scope = "/".join(parts[:_SCOPE_PARTS])
        try:
            Scope.from_prefix(scope)
        except ValueError:
            continue
        kind, rest = parts[_SCOPE_PARTS], parts[_SCOPE_PARTS + 1:]
        if kind == "manifests" and len(rest) == 2 and rest[1].endswith(".json"):
            manifests.add(CheckpointKeys(scope, rest[0], rest[1][: -len(".json")]))
        elif kind == "data" and len(rest) >= 3:
            data.setdefault(CheckpointKeys(scope, rest[0], rest[1]), []).append(obj)
        elif not (kind == "latest.json" and not rest):
            continue
        scopes.add(scope)
    loose = [k for k in data if k not in manifests]
    return Inventory(
        prefix=prefix,
        scopes=tuple(sorted(scopes)),
        manifests=tuple(CheckpointKeys.newest_first(manifests)),
        uncommitted=tuple(Uncommitted(k, tuple(sorted(data[k], key=lambda o: o.key)))
                          for k in CheckpointKeys.newest_first(loose)),
    )
