"""The one reader of committed checkpoints: list a scope, choose, read a manifest.

Every face that lists or picks checkpoints (``current.checkpoint``, the ``Checkpoint``
class, the load policies, the card) goes through a :class:`Catalog` over an engine's
backend, so they all agree on what exists (a manifest, nothing else) and on what is
newest (:meth:`CheckpointKeys.newest_first`, never a host's clock).
"""

from __future__ import annotations

import dataclasses

from .engine import Engine
from .errors import ManifestError
from .layout import CheckpointKeys, Scope
from .manifest import Manifest

__all__ = ["Catalog", "Entry"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """A committed checkpoint: where its manifest is, and what it says."""

    keys: CheckpointKeys
    manifest: Manifest

    @property
    def attempt(self) -> int:
        try:
            return int(self.manifest.identity.get("attempt", -1))
        except (TypeError, ValueError):
            return -1

    @property
    def task_id(self) -> str:
        return str(self.manifest.identity.get("task_id", ""))


class Catalog:
    """Committed checkpoints of a store, read through ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def entries(self, scope_prefix: str, *, run_id: str | None = None) -> list[Entry]:
        """Every committed checkpoint of a scope (of one run, if given), newest first."""
        prefix = Scope.from_prefix(scope_prefix).manifests_prefix(run_id)
        found = self.engine.list_manifest_keys(prefix)
        out = []
        # Read all at once: on S3, one at a time costs a round trip per checkpoint.
        for keys, m in zip(found, self.engine.read_manifests(found), strict=True):
            if isinstance(m, ManifestError):
                self._skip(keys, m)
            elif m is not None:
                out.append(Entry(keys, m))
        return out

    def _skip(self, keys: CheckpointKeys, e: ManifestError) -> None:
        """One warning for a manifest that cannot be read; listings go on without it.

        One corrupt manifest, or one a newer version wrote for newer readers only, must
        not stop a listing, nor a task start that resumes from an older checkpoint.
        """
        url = self.engine.backend.url_of(keys.manifest)
        self.engine.warn_once(keys.manifest, (
            f"WARNING: skipping checkpoint manifest {url}: {e}. Readers ignore it; older "
            "checkpoints are unaffected."))

    def select(self, scope_prefix: str, *, run_id: str | None = None,
               task_id: str | None = None, name: str | None = None,
               attempt: int | None = None, latest_only: bool = False) -> list[Entry]:
        """:meth:`entries`, filtered; ``latest_only`` keeps those saved with ``latest=True``."""
        return [e for e in self.entries(scope_prefix, run_id=run_id)
                if (task_id is None or e.task_id == str(task_id))
                and (name is None or e.manifest.name == name)
                and (attempt is None or e.attempt == int(attempt))
                and (not latest_only or e.manifest.latest)]

    def latest(self, scope_prefix: str, *, run_id: str | None = None,
               task_id: str | None = None) -> Entry | None:
        """The checkpoint to resume from: the newest saved with ``latest=True``."""
        found = self.select(scope_prefix, run_id=run_id, task_id=task_id, latest_only=True)
        return found[0] if found else None

    def read(self, manifest_key: str) -> Entry | None:
        """The checkpoint whose manifest is at ``manifest_key``; None if not committed.

        Raises ValueError when ``manifest_key`` is not a manifest key.
        """
        keys = CheckpointKeys.from_manifest_key(manifest_key)
        m = self.engine.read_manifest(keys)
        return None if m is None else Entry(keys, m)

    def load(self, entry: Entry, dest: str) -> None:
        """Copy ``entry``'s files into ``dest``, verifying each checksum.

        Data is read under the key the manifest was found at, whatever its body says.
        """
        self.engine.load(entry.manifest, dest, keys=entry.keys)
