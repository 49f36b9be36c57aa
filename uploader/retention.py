"""Retention: which committed checkpoints of a scope to keep, and deleting the rest.

A prune is planned (:func:`plan_prune`, reads only) and then executed
(:func:`execute_prune`). It deletes three kinds of things:

- committed checkpoints no rule keeps. The newest of the set considered is always kept,
  and with no rule set nothing committed is deleted;
- debris: data of checkpoints that never committed (their upload failed, their process
  was killed), once its newest object is older than a grace period, so an upload in
  flight is never touched;
- incomplete multipart uploads under the scope older than the grace period, which S3
  bills until someone aborts them and a killed task cannot.

Order, per checkpoint: its manifest first (from then on it does not exist for any
reader), then its data objects. A crash between the two leaves data no manifest names,
which the next prune removes as debris: readers only ever see committed and complete
checkpoints. An object is never deleted while a remaining manifest of the scope (of any
run) points at it through ``FileEntry.key``, nor while a save of the engine not yet
committed may (``Engine.referenced_keys()``); data is deleted through
``Engine.delete_unreferenced()``, which never lands between a save's check of what it
points at and its commit. A scope with a manifest this version cannot read is not pruned
at all: what it references is unknown.

The ``latest.json`` hint is never rewritten: a prune only deletes, so it can never race a
writer into a worse state, and readers list manifests rather than trust the hint.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

from .backends.base import StoredObject
from .backends.local import TEMP_PREFIX
from .catalog import Catalog, Entry
from .engine import Engine
from .errors import ManifestError
from .gang import GangPart, group, parse_markers
from .layout import CheckpointKeys, Scope, safe_component
from .leases import PruneGuard
from .manifest import Manifest

__all__ = ["BEST_MODES", "DEFAULT_GRACE_S", "ManifestCache", "PrunePlan", "PruneReport",
           "RetentionPolicy", "choose", "execute_prune", "parse_count", "parse_grace",
           "plan_prune", "prune"]

# Long enough that no upload in flight is ever taken for debris: a 2 TB file at 100 MB/s
# takes under 6 hours.
DEFAULT_GRACE_S = 6 * 3600.0
BEST_MODES = ("min", "max")


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """Which committed checkpoints to keep. With no rule set, every one is kept."""

    keep_last: int | None = None  # the N newest committed checkpoints
    keep_best: int | None = None  # the M best by metadata[best_metric]
    best_metric: str | None = None
    best_mode: str = "min"  # "min" | "max"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_best"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name}={v!r} is not valid: use an integer >= 1, or None "
                                 "for no such rule.")
        if self.best_metric is not None and (not isinstance(self.best_metric, str)
                                             or not self.best_metric):
            raise ValueError(f"best_metric={self.best_metric!r} is not valid: use the name of "
                             "a key of the metadata passed to save(), e.g. 'val_loss'.")
        if self.keep_best is not None and self.best_metric is None:
            raise ValueError(f"keep_best={self.keep_best} needs best_metric: the metadata key "
                             "to rank checkpoints by, e.g. best_metric='val_loss'.")
        if self.best_mode not in BEST_MODES:
            raise ValueError(f"best_mode={self.best_mode!r} is not valid: use 'min' (lower is "
                             "better) or 'max'.")

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_best is not None


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """What a prune would do; :func:`execute_prune` does it."""

    keep: tuple[Entry, ...]  # newest first
    delete: tuple[Entry, ...]  # newest first
    reasons: dict[str, str]  # checkpoint id -> why kept, or why deleted
    debris: tuple[str, ...]  # data prefixes of checkpoints that never committed
    uploads: tuple[tuple[str, str], ...]  # (key, upload id) of stale multipart uploads
    # Manifest keys this version cannot read: while there are any, nothing is deleted.
    unreadable: tuple[str, ...] = ()
    scope_prefix: str = ""
    # Temporary files a writer killed mid-manifest left under manifests/ (local store):
    # never a manifest, and removed once older than the grace period.
    stale_temp: tuple[str, ...] = ()
    # Leases and prune markers (uploader.leases) that dead processes left, expired for
    # longer than the grace period.
    stale_locks: tuple[str, ...] = ()
    grace_s: float = DEFAULT_GRACE_S
    # The clock ages are measured on is the store's; a ``now`` given to plan_prune moves
    # it by this much, for execute_prune's second look too.
    clock_offset: float = 0.0
    # Bytes of data objects executing the plan frees: the deleted checkpoints' and the
    # debris's, less what a remaining manifest (of any run) or a pending save reads.
    freed_bytes: int = 0


@dataclasses.dataclass
class PruneReport:
    checkpoints_deleted: int = 0
    objects_deleted: int = 0  # manifests and data objects
    bytes_freed: int = 0  # of data objects
    debris_removed: int = 0
    uploads_aborted: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def deleted_anything(self) -> bool:
        return bool(self.objects_deleted or self.uploads_aborted)


# -- parsing values given as strings (configuration) ---------------------------------


def parse_count(value: Any, name: str) -> int | None:
    """An int >= 1 (or None) from a decorator argument or a configuration string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            value = None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} is not valid: expected an integer >= 1 (unset keeps every "
                         "checkpoint).")
    return value


def parse_grace(value: Any, name: str) -> float:
    """Seconds >= 0 (unset: :data:`DEFAULT_GRACE_S`)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_GRACE_S
    try:
        grace = float(value)
    except (TypeError, ValueError):
        grace = math.nan
    if isinstance(value, bool) or not 0 <= grace < math.inf:
        raise ValueError(f"{name} is not valid: expected seconds >= 0, e.g. 21600 (6 hours, "
                         "the default); uploads in flight younger than this are never touched.")
    return grace


# -- planning ------------------------------------------------------------------------


def _metric(entry: Entry, name: str) -> float | None:
    v = entry.manifest.metadata.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return None if math.isnan(v) else v


def choose(entries: Sequence[Entry], policy: RetentionPolicy,
           protect: Iterable[str] = ()) -> dict[str, str]:
    """Why each kept checkpoint of ``entries`` (newest first) is kept, by checkpoint id.

    Always kept: the newest, and each run's resume point (what its task saved last with
    ``latest=True``), so that of several runs considered together an older one still
    running can retry."""
    reasons: dict[str, list[str]] = {}

    def keep(e: Entry, why: str) -> None:
        reasons.setdefault(e.keys.checkpoint_id, []).append(why)

    if entries:
        keep(entries[0], "newest")
    # What a retry resumes from: the newest saved with latest=True by its task, in its
    # run. Kept for every run considered: an older run may still be running.
    resumes: dict[tuple[str, str], Entry] = {}
    for e in entries:
        if e.manifest.latest:
            resumes.setdefault((e.keys.run_id, e.task_id), e)
    for e in resumes.values():
        if e is not entries[0]:
            keep(e, f"resume point of run {e.manifest.run_id} (its newest with latest=True: "
                    "a retry of its task resumes from it)")
    if policy.keep_last is not None:
        for e in entries[:policy.keep_last]:
            keep(e, f"last {policy.keep_last}")
    if policy.keep_best is not None and policy.best_metric is not None:
        sign = 1.0 if policy.best_mode == "min" else -1.0
        ranked = [(sign * m, i, e) for i, e in enumerate(entries)
                  if (m := _metric(e, policy.best_metric)) is not None]
        ranked.sort(key=lambda t: (t[0], t[1]))  # ties: the newer wins
        for _, _, e in ranked[:policy.keep_best]:
            keep(e, f"best {policy.keep_best} by {policy.best_metric}")
    protected = set(protect)
    for e in entries:
        if e.keys.checkpoint_id in protected:
            keep(e, "protected")
    return {cid: ", ".join(why) for cid, why in reasons.items()}


ManifestCache = dict[str, Manifest | ManifestError | None]


def _manifests(engine: Engine, scope_prefix: str, cache: ManifestCache | None = None
               ) -> tuple[list[Entry], list[CheckpointKeys], list[str]]:
    """Readable entries (newest first), every manifest's keys, and the unreadable ones.

    ``cache`` (manifest key -> what was read) saves reading a manifest again: a manifest is
    never rewritten, so a prune after each commit reads only the new ones. It is updated
    to hold exactly the manifests listed now.
    """
    found = engine.list_manifest_keys(f"{scope_prefix}/manifests/")
    known = {} if cache is None else cache
    todo = [k for k in found if k.manifest not in known or known[k.manifest] is None]
    read = dict(zip((k.manifest for k in todo), engine.read_manifests(todo), strict=True))
    got = {k.manifest: read[k.manifest] if k.manifest in read else known[k.manifest]
           for k in found}
    if cache is not None:
        cache.clear()
        cache.update(got)
    entries: list[Entry] = []
    unreadable: list[str] = []
    for keys in found:
        m = got[keys.manifest]
        if isinstance(m, ManifestError):
            unreadable.append(keys.manifest)
        elif m is not None:
            entries.append(Entry(keys, m))
    return entries, found, unreadable


def _referenced(engine: Engine, entries: Iterable[Entry], guard: PruneGuard) -> set[str]:
    """Every key a manifest in ``entries``, a save of ``engine`` not yet committed, or a
    live lease of any process's save stores bytes under."""
    refs: set[str] = set(engine.referenced_keys()) | guard.spared
    for e in entries:
        refs.update(e.keys.stored(f.path, f.key) for f in e.manifest.files)
    return refs


def _by_checkpoint(scope_prefix: str, objects: Iterable[StoredObject]
                   ) -> dict[tuple[str, str], list[StoredObject]]:
    """Objects under ``<scope>/data/``, grouped by (run, checkpoint id)."""
    head = f"{scope_prefix}/data/"
    groups: dict[tuple[str, str], list[StoredObject]] = {}
    for o in objects:
        parts = o.key[len(head):].split("/", 2)
        if o.key.startswith(head) and len(parts) == 3:
            groups.setdefault((parts[0], parts[1]), []).append(o)
    return groups


def plan_prune(catalog: Catalog, scope_prefix: str, policy: RetentionPolicy, *,
               run_id: str | None = None, protect: Iterable[str] = (),
               grace_s: float = DEFAULT_GRACE_S, now: float | None = None,
               manifest_cache: ManifestCache | None = None) -> PrunePlan:
    """What to delete in the scope at ``scope_prefix``; reads only.

    ``run_id`` limits the committed checkpoints considered (for keeping and deleting) to
    one run; debris and stale uploads are looked for in the whole scope. ``protect`` are
    checkpoint ids never deleted (nor their data taken for debris). ``now`` (seconds since
    the epoch) is the clock the grace period is measured against. ``manifest_cache``, a
    dict kept between prunes of one scope, spares reading the same manifests again.

    Raises ValueError for a prefix that is not a scope's.
    """
    engine = catalog.engine
    prefix = Scope.from_prefix(scope_prefix).prefix
    with PruneGuard(engine, prefix) as guard:
        return _plan(catalog, prefix, policy, guard, run_id=run_id, protect=protect,
                     grace_s=grace_s, now=now, manifest_cache=manifest_cache)


def _plan(catalog: Catalog, prefix: str, policy: RetentionPolicy, guard: PruneGuard, *,
          run_id: str | None, protect: Iterable[str], grace_s: float, now: float | None,
          manifest_cache: ManifestCache | None) -> PrunePlan:
    engine = catalog.engine
    clock = guard.now if now is None else now
    before = clock - grace_s
    protect = frozenset(protect)
    entries, all_keys, unreadable = _manifests(engine, prefix, manifest_cache)
    run = None if run_id is None else safe_component(str(run_id))
    considered = [e for e in entries if run is None or e.keys.run_id == run]
    common: dict[str, Any] = {
        "scope_prefix": prefix, "grace_s": grace_s, "clock_offset": clock - guard.now,
        "uploads": _stale_uploads(engine, prefix, before, guard),
        "stale_temp": _stale_temp(engine, prefix, before),
        "stale_locks": _stale_locks(guard, clock, grace_s)}
    if unreadable:
        reasons = {e.keys.checkpoint_id: "kept: the scope has a manifest this version cannot "
                   "read, which may reference its data" for e in considered}
        return PrunePlan(keep=tuple(considered), delete=(), reasons=reasons, debris=(),
                         unreadable=tuple(unreadable), **common)
    reasons = _keep_whole_gangs(engine, prefix, considered, policy, protect)
    delete = [e for e in considered if reasons.get(e.keys.checkpoint_id, "deleted").startswith(
        "deleted")]
    for e in delete:
        reasons.setdefault(e.keys.checkpoint_id, "deleted: kept by no rule")
    refs = _referenced(engine, entries, guard)
    committed = {(k.run_id, k.checkpoint_id) for k in all_keys}
    objects = engine.run(engine.backend.list_objects, f"{prefix}/data/")
    debris = [f"{prefix}/data/{r}/{cid}/"
              for (r, cid), objs in sorted(_debris(prefix, objects, committed, protect,
                                                   guard, before).items())
              if any(o.key not in refs for o in objs)]
    doomed = {e.keys.checkpoint_id for e in delete}
    freed = _freed_bytes(engine, prefix, objects, delete, debris,
                         [e for e in entries if e.keys.checkpoint_id not in doomed], guard)
    return PrunePlan(keep=tuple(e for e in considered if e.keys.checkpoint_id not in doomed),
                     delete=tuple(delete), reasons=reasons, debris=tuple(debris),
                     freed_bytes=freed, **common)


def _debris(prefix: str, objects: Iterable[StoredObject], committed: set[tuple[str, str]],
            protect: frozenset[str], guard: PruneGuard, before: float
            ) -> dict[tuple[str, str], list[StoredObject]]:
    """Data of checkpoints that never committed and whose saves are over: no manifest, no
    live lease, and neither an object nor the lease written since ``before`` (on the
    store's clock). Data written after the prune's marker is never older than that."""
    leases = guard.view.lease_times()
    out = {}
    for (r, cid), objs in _by_checkpoint(prefix, objects).items():
        if (r, cid) in committed or cid in protect or (r, cid) in guard.leased:
            continue
        if max([o.mtime for o in objs] + [leases.get((r, cid), -math.inf)]) >= before:
            continue  # maybe still uploading
        out[(r, cid)] = objs
    return out


def _freed_bytes(engine: Engine, prefix: str, objects: Iterable[StoredObject],
                 delete: Iterable[Entry], debris: Iterable[str],
                 remaining: Iterable[Entry], guard: PruneGuard) -> int:
    """What deleting ``delete`` and ``debris`` frees, as :func:`execute_prune` counts it:
    their objects, but not those an incremental save of ``remaining`` points at."""
    refs = _referenced(engine, remaining, guard)
    groups = _by_checkpoint(prefix, objects)
    gone = {(e.keys.run_id, e.keys.checkpoint_id) for e in delete}
    for d in debris:
        run, _, cid = d[len(prefix) + len("/data/"):].rstrip("/").partition("/")
        gone.add((run, cid))
    return sum(o.size for g in gone for o in groups.get(g, ()) if o.key not in refs)


def _keep_whole_gangs(engine: Engine, prefix: str, considered: Sequence[Entry],
                      policy: RetentionPolicy, protect: frozenset[str]) -> dict[str, str]:
    """Why each checkpoint of ``considered`` is kept, or why it is deleted, by id; an id
    not in the result is deleted by no rule.

    A gang checkpoint (:mod:`uploader.gang`) counts once and is kept or deleted whole, by
    what its lowest rank's part says; one protected part protects every part. One not
    complete yet is kept while it is newer than every complete one (its ranks may still be
    committing), and is deleted once a complete one is newer: no reader will ever pick it.
    """
    units = group(considered, _participants(engine, prefix, considered))
    complete = [rep for rep, g in units if g is None or g.complete]
    shielded = set(protect)
    for rep, g in units:
        if g is not None and any(p.keys.checkpoint_id in protect for p in g.parts.values()):
            shielded.add(rep.keys.checkpoint_id)
    chosen = choose(complete, policy, shielded) if policy.active else {
        e.keys.checkpoint_id: "no retention rule set" for e in complete}
    reasons: dict[str, str] = {}
    before_any_complete = True
    for rep, g in units:
        if g is None:
            if rep.keys.checkpoint_id in chosen:
                reasons[rep.keys.checkpoint_id] = chosen[rep.keys.checkpoint_id]
            continue
        before_any_complete = before_any_complete and not g.complete
        if g.complete:
            why = chosen.get(rep.keys.checkpoint_id)
        elif before_any_complete or not policy.active:
            why = f"gang checkpoint in progress: rank(s) {g.missing} of {g.size} to commit"
        else:
            why = (f"deleted: an incomplete gang checkpoint (rank(s) {g.missing} never "
                   "committed) older than a complete one")
        if why is not None:
            for part in g.parts.values():
                reasons[part.keys.checkpoint_id] = why
    return reasons


def _participants(engine: Engine, prefix: str, entries: Sequence[Entry]
                  ) -> dict[tuple[str, str], set[int]]:
    if not any(GangPart.of(e.manifest) for e in entries):
        return {}
    return parse_markers(prefix, engine.list_keys(f"{prefix}/gangs/"))


def _stale_temp(engine: Engine, prefix: str, before: float) -> tuple[str, ...]:
    found = engine.run(engine.backend.list_objects, f"{prefix}/manifests/")
    return tuple(sorted(o.key for o in found
                        if o.key.rpartition("/")[2].startswith(TEMP_PREFIX)
                        and o.mtime < before))


def _leased_data(guard: PruneGuard) -> tuple[str, ...]:
    prefix = guard.scope_prefix
    return tuple(f"{prefix}/data/{run}/{cid}/" for run, cid in guard.leased)


def _stale_uploads(engine: Engine, prefix: str, before: float, guard: PruneGuard
                   ) -> tuple[tuple[str, str], ...]:
    found = engine.run(engine.backend.list_uploads, f"{prefix}/")
    live = _leased_data(guard)
    return tuple(sorted((u.key, u.upload_id) for u in found
                        if u.initiated < before and not u.key.startswith(live)))


def _stale_locks(guard: PruneGuard, clock: float, grace_s: float) -> tuple[str, ...]:
    return tuple(sorted(lk.key for lk in guard.view.locks
                        if lk.key != guard.key and clock - lk.mtime > lk.ttl + grace_s))


# -- executing -----------------------------------------------------------------------


def execute_prune(catalog: Catalog, plan: PrunePlan, *,
                  manifest_cache: ManifestCache | None = None) -> PruneReport:
    """Delete what ``plan`` says, manifests first. Never raises for a storage error: each
    one is in the report's ``errors``, and what it stopped is left for the next prune.

    Raises ValueError for a plan built by hand that names more than one scope.
    """
    return _execute_plan(catalog, plan, None, manifest_cache)


def _execute_plan(catalog: Catalog, plan: PrunePlan, guard: PruneGuard | None,
                  manifest_cache: ManifestCache | None) -> PruneReport:
    engine = catalog.engine
    report = PruneReport()
    if not plan.scope_prefix:  # a plan built by hand: the scope its checkpoints name
        scopes = {e.keys.scope_prefix for e in plan.delete} | {
            d.rstrip("/").rsplit("/", 3)[0] for d in plan.debris}
        if len(scopes) > 1:
            raise ValueError(f"a prune plan covers one scope; this one names {sorted(scopes)}")
        plan = dataclasses.replace(plan, scope_prefix=scopes.pop() if scopes else "")
    if plan.unreadable:
        report.errors.append(
            f"not pruning {plan.scope_prefix}: {len(plan.unreadable)} manifest(s) cannot be "
            f"read by this version (e.g. {engine.backend.url_of(plan.unreadable[0])}), and "
            "may reference data of other checkpoints. Upgrade the package, or remove them.")
    if not (plan.delete or plan.debris or plan.stale_temp or plan.stale_locks
            or plan.uploads):
        return report
    if guard is not None:
        _execute(engine, plan, guard, report, manifest_cache)
        return report
    try:
        with PruneGuard(engine, plan.scope_prefix) as own:
            _execute(engine, plan, own, report, manifest_cache)
    except Exception as e:  # the marker could not be written or the locks listed
        report.errors.append(f"not pruning {plan.scope_prefix}: {e}")
    return report


def _execute(engine: Engine, plan: PrunePlan, guard: PruneGuard, report: PruneReport,
             manifest_cache: ManifestCache | None) -> None:
    backend = engine.backend
    # 1. The commit points: from here on these checkpoints exist for no reader.
    gone: list[Entry] = []
    if plan.delete:
        manifests = [e.keys.manifest for e in plan.delete]
        failed = _delete(engine, manifests, report)
        gone = [e for e in plan.delete if e.keys.manifest not in failed]
        report.checkpoints_deleted = len(gone)
        report.objects_deleted += len(gone)
    # 2. Their data and the debris, minus whatever anything still references. Looked at
    # again now: a save may have committed (and a pending one started) since the plan.
    if gone or plan.debris:
        try:
            _delete_data(engine, plan, gone, report, manifest_cache, guard)
        except Exception as e:
            report.errors.append(f"not deleting data under {plan.scope_prefix}: {e}. What is "
                                 "left is removed as debris by a later prune.")
    # 3. What writers killed mid-manifest left: never read, never referenced.
    if plan.stale_temp:
        failed = _delete(engine, plan.stale_temp, report)
        removed = sum(1 for k in plan.stale_temp if k not in failed)
        report.objects_deleted += removed
        report.debris_removed += removed
    # 4. Locks of processes that died: only those still expired as looked at now.
    guard.fresh()
    clock = guard.now + plan.clock_offset
    still = set(_stale_locks(guard, clock, plan.grace_s))
    locks = [k for k in plan.stale_locks if k in still]
    if locks:
        failed = _delete(engine, locks, report)
        report.objects_deleted += sum(1 for k in locks if k not in failed)
    # 5. Multipart uploads that will never complete, unless a save has taken a lease since.
    live = _leased_data(guard)
    for key, upload_id in plan.uploads:
        if key.startswith(live):
            continue
        try:
            engine.run(backend.abort_upload, key, upload_id)
            report.uploads_aborted += 1
        except Exception as e:
            report.errors.append(str(e))


def _delete(engine: Engine, keys: Sequence[str], report: PruneReport) -> set[str]:
    """Delete ``keys``; return those that failed (named in the report's errors)."""
    try:
        failed = engine.run(engine.backend.delete_keys, list(keys))
    except Exception as e:
        report.errors.append(str(e))
        return set(keys)
    report.errors.extend(reason for _, reason in failed)
    return {k for k, _ in failed}


def _delete_data(engine: Engine, plan: PrunePlan, gone: Sequence[Entry],
                 report: PruneReport, cache: ManifestCache | None, guard: PruneGuard) -> None:
    prefix = plan.scope_prefix
    for _ in range(3):
        guard.fresh()  # leases looked at no earlier than REFRESH_S ago
        refs = set(engine.referenced_keys())  # before the listing
        entries, all_keys, unreadable = _manifests(engine, prefix, cache)
        if unreadable:
            raise RuntimeError(f"a manifest that cannot be read appeared ({unreadable[0]})")
        refs |= _referenced(engine, entries, guard)
        committed = {(k.run_id, k.checkpoint_id) for k in all_keys}
        objects = engine.run(engine.backend.list_objects, f"{prefix}/data/")
        if not guard.overdue:
            break
    else:
        raise RuntimeError("listing the scope took longer than a prune may go without "
                           "renewing its marker, three times over")
    groups = _by_checkpoint(prefix, objects)
    # Debris is judged again: a save may have taken a lease or written since the plan.
    still = _debris(prefix, objects, committed, frozenset(), guard,
                    guard.now + plan.clock_offset - plan.grace_s)
    targets: list[tuple[str, list[StoredObject]]] = []
    for e in gone:
        targets.append(("", groups.get((e.keys.run_id, e.keys.checkpoint_id), [])))
    for d in plan.debris:
        run, cid = d[len(prefix) + len("/data/"):].rstrip("/").split("/")
        if (run, cid) in still:
            targets.append((d, still[(run, cid)]))
    doomed = [o for _, objs in targets for o in objs if o.key not in refs]
    # Through the engine, which spares what a save registered since ``refs`` was read,
    # and keeps the deletion from landing between a save's check of what it points at
    # and its commit.
    deleted: set[str] = set()
    if doomed:
        try:
            done, failed = engine.delete_unreferenced([o.key for o in doomed])
        except Exception as e:
            report.errors.append(str(e))
        else:
            deleted = set(done)
            report.errors.extend(reason for _, reason in failed)
    for o in doomed:
        if o.key in deleted:
            report.objects_deleted += 1
            report.bytes_freed += o.size
    report.debris_removed += sum(1 for d, objs in targets
                                 if d and all(o.key in deleted or o.key in refs for o in objs))


def prune(catalog: Catalog, scope_prefix: str, policy: RetentionPolicy, *,
          run_id: str | None = None, protect: Iterable[str] = (),
          grace_s: float = DEFAULT_GRACE_S, now: float | None = None,
          manifest_cache: ManifestCache | None = None) -> PruneReport:
    """:func:`plan_prune`, then :func:`execute_prune`, under one prune marker."""
    prefix = Scope.from_prefix(scope_prefix).prefix
    with PruneGuard(catalog.engine, prefix) as guard:
        plan = _plan(catalog, prefix, policy, guard, run_id=run_id, protect=protect,
                     grace_s=grace_s, now=now, manifest_cache=manifest_cache)
        return _execute_plan(catalog, plan, guard, manifest_cache)
