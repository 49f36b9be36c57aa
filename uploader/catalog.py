"""The one reader of committed checkpoints: list a scope, choose, read a manifest.

Every face that lists or picks checkpoints (``current.checkpoint``, the ``Checkpoint``
class, the load policies, the card) goes through a :class:`Catalog` over an engine's
backend, so they all agree on what exists (a manifest, nothing else) and on what is
newest (:meth:`CheckpointKeys.newest_first`, never a host's clock).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from .engine import Engine
from .errors import ManifestError
from .gang import Gang, GangPart, group, parse_markers
from .layout import CheckpointKeys, Scope, safe_component
from .manifest import Manifest

__all__ = ["Catalog", "Entry"]

# Manifests read at once by newest_first(): a few at first (a task start needs one), more
# as a caller goes on.
_FIRST_BATCH = 4
_MAX_BATCH = 256


@dataclasses.dataclass(frozen=True)
class Entry:
    """A committed checkpoint: where its manifest is, and what it says."""

    keys: CheckpointKeys
    manifest: Manifest
    # A gang checkpoint (see uploader.gang): this entry is one rank's part of it.
    gang: Gang | None = None

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

    def __init__(self, engine: Engine, *, remembered: bool = False) -> None:
        """``remembered``: listings take the manifests ``engine`` committed itself as it
        wrote them, rather than read them again (the listings of the task that saved
        them; what exists is still what the store lists)."""
        self.engine = engine
        self.remembered = remembered

    def entries(self, scope_prefix: str, *, run_id: str | None = None,
                incomplete: bool = False) -> list[Entry]:
        """Every committed checkpoint of a scope (of one run, if given), newest first.

        A gang checkpoint is one entry, its lowest rank's part, with ``gang`` set; it is
        left out until every participant's part is committed, unless ``incomplete``.
        """
        scope = Scope.from_prefix(scope_prefix)
        found = self.engine.list_manifest_keys(scope.manifests_prefix(run_id))
        out = []
        # Read all at once: on S3, one at a time costs a round trip per checkpoint.
        read = self.engine.read_manifests(found, remembered=self.remembered)
        for keys, m in zip(found, read, strict=True):
            if isinstance(m, ManifestError):
                self._skip(keys, m)
            elif m is not None:
                out.append(Entry(keys, m))
        if not any(GangPart.of(e.manifest) for e in out):
            return out
        markers = self.engine.list_keys(f"{scope.prefix}/gangs/"
                                        + ("" if run_id is None else
                                           f"{safe_component(run_id)}/"))
        return [e if g is None else dataclasses.replace(e, gang=g)
                for e, g in group(out, parse_markers(scope.prefix, markers))
                if g is None or incomplete or g.complete]

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
               attempt: int | None = None, latest_only: bool = False,
               gang_id: str | None = None, rank: int | None = None) -> list[Entry]:
        """:meth:`entries`, filtered; ``latest_only`` keeps those saved with ``latest=True``.

        A gang checkpoint matches ``task_id`` when one of its parts was saved by that task,
        and is then given as that part; ``gang_id`` keeps the checkpoints of one gang, and
        ``rank`` gives each as the part that rank loads (:meth:`Gang.part_for`).
        """
        out = []
        for e in self.entries(scope_prefix, run_id=run_id):
            g = e.gang
            if g is not None and rank is not None:
                e = dataclasses.replace(g.part_for(rank), gang=g)
            if task_id is not None and e.task_id != str(task_id):
                mine = [p for p in (g.parts.values() if g is not None else ())
                        if p.task_id == str(task_id)]
                if not mine:
                    continue
                e = dataclasses.replace(mine[0], gang=g)
            if ((gang_id is None or (g is not None and g.gang_id == gang_id))
                    and (name is None or e.manifest.name == name)
                    and (attempt is None or e.attempt == int(attempt))
                    and (not latest_only or e.manifest.latest)):
                out.append(e)
        return out

    def latest(self, scope_prefix: str, *, run_id: str | None = None,
               task_id: str | None = None) -> Entry | None:
        """The checkpoint to resume from: the newest saved with ``latest=True``."""
        return next(self.newest_first(scope_prefix, run_id=run_id, task_id=task_id,
                                      latest_only=True), None)

    def newest_first(self, scope_prefix: str, *, run_id: str | None = None,
                     task_id: str | None = None, latest_only: bool = False
                     ) -> Iterator[Entry]:
        """What :meth:`select` gives, newest first, reading manifests only as far as the
        caller goes: a task start that resumes from the newest checkpoint reads a few
        manifests, however many the scope holds (the order comes from the keys alone,
        see :meth:`CheckpointKeys.newest_first`).

        Where the scope holds gang checkpoints, whose parts are only seen whole, it
        falls back to :meth:`select` for what is left.
        """
        scope = Scope.from_prefix(scope_prefix)
        found = self.engine.list_manifest_keys(scope.manifests_prefix(run_id))
        given: set[CheckpointKeys] = set()
        i, batch = 0, _FIRST_BATCH
        while i < len(found):
            chunk = found[i:i + batch]
            read = self.engine.read_manifests(chunk, remembered=self.remembered)
            if any(isinstance(m, Manifest) and GangPart.of(m) for m in read):
                for e in self.select(scope_prefix, run_id=run_id, task_id=task_id,
                                     latest_only=latest_only):
                    if e.keys not in given:
                        yield e
                return
            for keys, m in zip(chunk, read, strict=True):
                if isinstance(m, ManifestError):
                    self._skip(keys, m)
                elif (m is not None and (not latest_only or m.latest)
                      and (task_id is None or str(m.identity.get("task_id", "")) == str(task_id))):
                    given.add(keys)
                    yield Entry(keys, m)
            i += batch
            batch = min(batch * 4, _MAX_BATCH)

    def read(self, manifest_key: str, *, with_gang: bool = False) -> Entry | None:
        """The checkpoint whose manifest is at ``manifest_key``; None if not committed.
        ``with_gang``: a part of a gang checkpoint comes with its ``gang``, which costs a
        read of every manifest of its run.

        Raises ValueError when ``manifest_key`` is not a manifest key.
        """
        keys = CheckpointKeys.from_manifest_key(manifest_key)
        m = self.engine.read_manifest(keys)
        if m is None:
            return None
        if with_gang and GangPart.of(m) is not None:
            # A part is shown with its gang checkpoint, complete or not.
            for e in self.entries(keys.scope_prefix, run_id=keys.run_id, incomplete=True):
                if e.gang is not None and any(p.keys == keys for p in e.gang.parts.values()):
                    return dataclasses.replace(Entry(keys, m), gang=e.gang)
        return Entry(keys, m)

    def load(self, entry: Entry, dest: str) -> None:
        """Copy ``entry``'s files into ``dest``, verifying each checksum.

        Data is read under the key the manifest was found at, whatever its body says.
        """
        self.engine.load(entry.manifest, dest, keys=entry.keys)
