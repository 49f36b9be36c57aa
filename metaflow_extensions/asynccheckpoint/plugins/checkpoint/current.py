"""``current.checkpoint``: what a step using ``@checkpoint`` talks to."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from uploader import (
    CheckpointError,
    CheckpointHandle,
    CheckpointKeys,
    CheckpointState,
    DrainProgress,
    Engine,
    Pruner,
    RetentionPolicy,
    SaveRequest,
    Scope,
    Settings,
    new_checkpoint_id,
)
from uploader.catalog import Catalog, Entry
from uploader.gang import GANG_FIELD, GangMember, GangPart, Resume, decision_key, marker_key
from uploader.manifest import PLACEHOLDER, freeze_metadata
from uploader.sequence import SaveSequence

from ..shared.exceptions import (
    CheckpointException,
    CheckpointPathNotFound,
    CheckpointUploadException,
)
from ..shared.logs import is_debug, say
from ..shared.reader import Reader
from ..shared.reference import CheckpointReference, local_now, reference_fields
from ..shared.report import InSaveOrder, commit_line, drain_line, size_text
from ..shared.storage import backend_factory

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


_log = say  # stderr, prefixed [@checkpoint], as METAFLOW_CHECKPOINT_LOG_LEVEL lets through



def _once(entries: Iterable[Entry]) -> Iterator[Entry]:
    """``entries`` without repeats: a checkpoint found by two searches is tried once."""
    seen: set[Any] = set()
    for e in entries:
        if e.keys not in seen:
            seen.add(e.keys)
            yield e

class TaskIdentity:
    def __init__(self, *, flow: str, run_id: str, step: str, task_id: str, attempt: int,
                 namespace: str, gang: GangMember | None = None) -> None:
        self.flow, self.run_id, self.step = flow, run_id, step
        self.task_id, self.attempt, self.namespace = task_id, attempt, namespace
        self.gang = gang  # this task's rank in a @parallel gang

    @property
    def pathspec(self) -> str:
        return f"{self.flow}/{self.run_id}/{self.step}/{self.task_id}"

    def as_dict(self) -> dict[str, Any]:
        return {"flow": self.flow, "run_id": self.run_id, "step": self.step,
                "task_id": self.task_id, "attempt": self.attempt, "namespace": self.namespace,
                "pathspec": self.pathspec, "host": socket.gethostname(), "pid": os.getpid(),
                **({} if self.gang is None else {GANG_FIELD: self.gang.as_dict()})}


class CurrentCheckpoint:
    """The checkpoint API of a running step: ``current.checkpoint``."""

    def __init__(self, *, identity: TaskIdentity, scope: Scope, settings: Settings,
                 datastore: str, datastore_root: str, temp_dir_root: str | None,
                 log: Callable[[str], None] = _log, noun: str = "checkpoint",
                 retention: tuple[RetentionPolicy, float] | None = None,
                 sequence: str | None = None, origin_run_id: str | None = None) -> None:
        """``retention``: the policy and debris grace pruning applies after each commit.
        ``sequence``: the save counter file of the task that started this process (one
        is made otherwise). ``origin_run_id``: the run ``resume`` resumes, whose
        checkpoints of this step a ``fresh`` start considers after this task's own."""
        import tempfile

        self._origin_run_id = origin_run_id

        self._identity = identity
        self._scope = scope
        self._datastore = datastore
        self._datastore_root = datastore_root
        self._log = log
        self._noun = noun  # what the log calls what is saved: "checkpoint", or "model"
        if temp_dir_root is not None:
            os.makedirs(temp_dir_root, exist_ok=True)
        self._directory = tempfile.mkdtemp(prefix="metaflow_checkpoint_", dir=temp_dir_root)
        # Snapshots sit next to the staging directory, on the same filesystem, so they can
        # be hardlinks.
        self._snapshot_dir = tempfile.mkdtemp(prefix="metaflow_checkpoint_snapshots_",
                                              dir=os.path.dirname(self._directory))
        # One line per commit, printed by the engine's loop thread in the order of the saves.
        detail = is_debug()
        self._commits = InSaveOrder(log, lambda: self._engine.handles,
                                    lambda h: commit_line(h, detail=detail))
        self._engine = Engine(backend_factory(datastore, datastore_root), settings,
                              snapshot_dir=self._snapshot_dir, log=log,
                              on_commit=self._commits.committed)
        self._reader = Reader(settings=settings, log=log,
                              home=(datastore, datastore_root, self._engine))
        self._loaded: CheckpointReference | None = None
        self._told_tar = False
        self._pruner: Pruner | None = None
        self._retention = retention
        self._declared = False  # this process's saves count this rank in its gang
        # What the task that started this process protects from retention.
        self._inherited_protect: list[str] = []
        self._own_sequence = sequence is None
        if sequence is None:
            fd, sequence = tempfile.mkstemp(prefix="metaflow_checkpoint_sequence_",
                                            dir=os.path.dirname(self._directory))
            os.close(fd)
        self._sequence = SaveSequence(sequence)

    def environment(self) -> str:
        """What a process this task starts needs to save for it (see ``Checkpoint``)."""
        i = self._identity
        policy, grace = self._retention or (RetentionPolicy(), 0.0)
        return json.dumps({
            "flow": i.flow, "run_id": i.run_id, "step": i.step, "task_id": i.task_id,
            "attempt": i.attempt, "namespace": i.namespace, "scope": self._scope.prefix,
            "datastore": self._datastore, "datastore_root": self._datastore_root,
            "gang": None if i.gang is None else i.gang.as_dict(),
            "sequence": self._sequence.path,
            "retention": dataclasses.asdict(policy), "debris_grace": grace,
            "protect": self._protected()})

    @classmethod
    def from_environment(cls, spec: str) -> CurrentCheckpoint:
        """The checkpoint API of a task, in a process that task started."""
        from ..shared.storage import engine_settings

        try:
            d = json.loads(spec)
            identity = TaskIdentity(
                flow=d["flow"], run_id=d["run_id"], step=d["step"], task_id=d["task_id"],
                attempt=int(d["attempt"]), namespace=d["namespace"],
                gang=None if d.get("gang") is None else GangMember.from_dict(d["gang"]))
            retention = None
            if d.get("retention") is not None:
                retention = (RetentionPolicy(**d["retention"]), float(d["debris_grace"]))
            child = cls(identity=identity, scope=Scope.from_prefix(d["scope"]),
                        settings=engine_settings(), datastore=d["datastore"],
                        datastore_root=d["datastore_root"], temp_dir_root=None,
                        retention=retention, sequence=d.get("sequence"))
            child._inherited_protect = [str(p) for p in d.get("protect", [])]
            child._start_retention()
            return child
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointException(
                f"METAFLOW_CHECKPOINT_TASK is not what a task using @checkpoint sets ({e}); "
                "do not set it by hand.") from e

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

    @property
    def task_identifier(self) -> str:
        """12 hex digits naming this step and foreach branch: the same in every attempt
        and in every run whose branch has the same foreach values."""
        return hashlib.sha256(self._scope.prefix.encode()).hexdigest()[:12]

    def save(
        self,
        path: str | os.PathLike[str] | None = None,
        name: str | None = DEFAULT_NAME,
        metadata: dict[str, Any] | None = None,
        latest: bool = True,
        storage_format: str = "files",
        *,
        wait: bool = False,
        step: int | None = None,
    ) -> CheckpointReference:
        """Snapshot ``path`` (default: ``directory``) and upload it in the background.

        Returns at once with a reference (a dict) that can be stored as an artifact and
        passed to ``load()``. With ``wait=True``, returns only once the checkpoint is
        durable, and raises if it could not be stored. ``latest=False`` keeps this
        checkpoint from being the one a retry resumes from.

        In a ``@parallel`` step each rank's save is its part of a gang checkpoint, made
        whole by the other ranks' saves of the same name and ``step``; without ``step``,
        the k-th save of a name on every rank belongs to the same one.
        """
        name = DEFAULT_NAME if name is None else name
        self._check_save_args(name, metadata, latest, storage_format)
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)
                                 or step < 0):
            raise CheckpointException(f"save(step=...) must be an integer >= 0 (the training "
                                      f"step this save belongs to), got {step!r}.")
        # Serialised now, as metaflow-checkpoint does: later changes to the caller's dict
        # are not recorded, and a value JSON cannot hold is a placeholder, not a failure.
        frozen, replaced = freeze_metadata(metadata or {})
        if replaced:
            self._log(f"WARNING: save(name={name!r}, metadata=...): {', '.join(replaced[:5])} "
                      f"cannot be JSON serialized and is stored as {PLACEHOLDER!r}. Convert "
                      "such values to str, numbers, lists or dicts before save().")
        source = os.path.abspath(os.fspath(path)) if path is not None else self._directory
        if not os.path.exists(source):
            raise CheckpointPathNotFound(
                f"cannot save {source!r}: no such file or directory. Pass save(path=...) an "
                "existing file or directory, or write into current.checkpoint.directory.")
        ident = self._identity
        seq, nth = self._sequence.next(name)
        cid = new_checkpoint_id(ident.task_id, ident.attempt, seq=seq)
        keys = CheckpointKeys(self._scope.prefix, ident.run_id, cid)
        identity = ident.as_dict()
        if ident.gang is not None:
            self._declare(ident.gang)
            identity[GANG_FIELD].update(step=GangPart.step_key(
                ident.attempt, name, nth if step is None else f"s{step}"), nth=nth)
        backend = self._engine.backend
        ref = CheckpointReference(reference_fields(
            manifest_key=keys.manifest, url=backend.url_of(keys.data_prefix), name=name,
            pathspec=ident.pathspec, attempt=ident.attempt, created_on=local_now(),
            metadata=copy.deepcopy(frozen), checkpoint_id=cid, scope=self._scope.prefix,
            datastore=self._datastore, datastore_root=self._datastore_root,
        ))
        try:
            handle = self._engine.save(SaveRequest(
                source=source, keys=keys, name=name, latest=latest,
                metadata=frozen, identity=identity, reference=ref,
            ))
        except CheckpointError as e:
            raise CheckpointException(str(e)) from e
        ref._handle = handle
        ref["size"] = handle.stats.bytes  # known at save, as with metaflow-checkpoint
        if wait or self._engine.synchronous:
            # In a forked child nothing drains at exit: its saves finish before returning.
            self._wait_one(handle)
        return ref

    def wait(self, timeout: float | None = None) -> list[CheckpointReference]:
        """Block until every save so far is durable; raise if the newest could not be.

        A torn checkpoint that a later save superseded is not an error here. With
        ``timeout=None`` it waits for as long as the uploads take.
        """
        report = self._engine.drain(math.inf if timeout is None else timeout)
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
        attempt: int | str | None = None,
        full_namespace: bool = False,
    ) -> list[dict[str, Any]]:
        """Checkpoints, newest first.

        Without ``task``: those of this task, every attempt, and first this process's own
        saves still in flight (``reference.state`` is "pending" or "uploading"), so what
        was just saved is listed at once; ``load()`` of one waits for its commit. With
        ``task`` (a pathspec or a ``metaflow.Task``): the committed ones of that task's
        latest attempt (``attempt=N``: of attempt N; ``attempt="all"``: of every one), then
        those ``metaflow-checkpoint`` saved in it (marked ``"source":
        "metaflow-checkpoint"``). ``full_namespace=True`` lists every run of this step and
        foreach branch in this namespace.
        """
        if task is not None:
            return self._reader.list_task(task, name=name, attempt=attempt)
        if attempt == "all":
            attempt = None
        if attempt is not None and (not isinstance(attempt, int) or isinstance(attempt, bool)):
            raise CheckpointException(
                f"list(attempt=...) takes an attempt number or 'all', got {attempt!r}.")
        i = self._identity
        # Taken before the store is read: one that commits in between is listed from the
        # store, never twice and never missed.
        in_flight = [] if attempt not in (None, i.attempt) else [
            h for h in reversed(self._engine.handles)
            if not h.done() and (name is None or h.name == name)]
        committed = self._list_committed(name, attempt, full_namespace)
        stored = {r.get("key") for r in committed}
        # One committed after the store was read is listed too; a torn or failed one not.
        return [h.reference for h in in_flight if h.reference.get("key") not in stored
                and h.state not in (CheckpointState.TORN, CheckpointState.FAILED)] + committed

    def _list_committed(self, name: str | None, attempt: int | None,
                        full_namespace: bool) -> list[dict[str, Any]]:
        i = self._identity
        # What this task saved is listed as its engine wrote it: one LIST, no GET each.
        catalog = Catalog(self._reader.home().engine, remembered=True)
        if full_namespace:
            found = catalog.select(self._scope.prefix, name=name, attempt=attempt,
                                   rank=None if i.gang is None else i.gang.rank)
        elif i.gang is not None:
            found = catalog.select(self._scope.prefix, run_id=i.run_id, gang_id=i.gang.gang_id,
                                   rank=i.gang.rank, name=name, attempt=attempt)
        else:
            found = catalog.select(self._scope.prefix, run_id=i.run_id, task_id=i.task_id,
                                   name=name, attempt=attempt)
        return [self._reader.reference(catalog, e) for e in found]

    def load(self, reference: dict[str, Any] | str, path: str | None = None, *,
             datastore_root: str | None = None) -> str:
        """Copy a checkpoint's files into ``path`` (default: a cleared ``directory``).

        ``reference`` is what ``save()`` or ``list()`` returned (possibly read back from
        an artifact, in a later step or run), or its ``key``. Files are copied out of
        the datastore, never linked, and verified against their checksums; symlinks
        already in ``path`` are replaced, never written through.

        A reference saved under another datastore root than this flow's is loaded only
        from the root passed as ``datastore_root``: a reference is data, and should not
        on its own decide which bucket or directory a task reads.
        """
        self._wait_if_saved_here(reference)
        catalog, entry = self._reader.resolve(
            reference, default=(self._datastore, self._datastore_root),
            datastore_root=datastore_root)
        if path is None:
            path = self._directory
            self._clear_directory()
        return self._reader.load(catalog, entry, path)

    def _wait_if_saved_here(self, reference: Any) -> None:
        # A reference saved moments ago in this task loads once it is committed.
        key = reference.get("key") if isinstance(reference, dict) else reference
        for h in self._engine.handles:
            if h.reference.get("key") == key and not h.done():
                self._wait_one(h)

    # -- task lifecycle (called by the decorator) ------------------------------------

    def _load_on_start(self, policy: str, *, legacy_identifier: str | None = None) -> None:
        """Load the checkpoint ``policy`` names into ``directory``.

        Where this package has none for the task (``fresh``) or the step and foreach
        branch (``eager``), the published ``metaflow-checkpoint``'s are considered, found
        as that package finds them (``legacy_identifier`` is its task identifier).
        """
        self._engine.backend  # noqa: B018  start the uploader now, not in the first save()
        if policy == "none":
            return
        if self._identity.gang is not None:
            self._load_gang_on_start(policy, self._identity.gang)
            return
        catalog = self._reader.home()
        # Newest first, each manifest read only if every newer candidate fails to load:
        # a start reads a few manifests however many checkpoints the scope holds.
        sources = [catalog.newest_first(self._scope.prefix, run_id=self._identity.run_id,
                                        task_id=self._identity.task_id, latest_only=True)]
        if self._origin_run_id is not None:
            # `resume`: this step failed in the run resumed from; its task there is this
            # task's earlier self.
            sources.append(catalog.newest_first(self._scope.prefix,
                                                run_id=self._origin_run_id, latest_only=True))
        if policy == "eager":
            sources.append(catalog.newest_first(self._scope.prefix, latest_only=True))
        found = self._load_first(catalog, _once(itertools.chain(*sources)))
        if found is None:
            self._load_legacy_on_start(policy, legacy_identifier)
            return
        self._loaded_from(catalog, found)

    def _load_first(self, catalog: Catalog, candidates: Iterable[Entry]) -> Entry | None:
        """Load the first of ``candidates`` that loads into ``directory``; None if none."""
        rest = iter(candidates)
        following = next(rest, None)
        while following is not None:
            entry, following = following, None
            try:
                catalog.load(entry, self._directory)
            except CheckpointError as e:
                # Loud, but never a task that cannot start: the next older one will do.
                self._clear_directory()
                following = next(rest, None)
                older = ("loading the next older one" if following is not None
                         else "no older checkpoint is left, so the task starts without one")
                self._log(f"ERROR: could not load checkpoint {entry.manifest.name!r} "
                          f"({entry.keys.checkpoint_id}): {e} Resuming from it is skipped; "
                          f"{older}.")
                continue
            return entry
        return None

    def _loaded_from(self, catalog: Catalog, found: Entry) -> None:
        manifest = found.manifest
        if catalog.engine is self._engine:
            # Read from the store this task saves to: its first save already skips what
            # is unchanged since the checkpoint it resumes from.
            self._engine.set_base(found.keys, manifest)
        self._loaded = self._reader.reference(catalog, found)
        member = self._identity.gang
        gang = ""
        if member is not None:
            owner = GangPart.of(manifest)
            whose = ("its own part" if owner is None or owner.member.rank == member.rank
                     else f"rank {owner.member.rank}'s part (this rank saves none)")
            gang = (f"; rank {member.rank} of {member.size}: {whose} of the gang checkpoint "
                    "every rank resumes from")
        self._log(f"Loaded checkpoint {manifest.name!r} saved by {self._loaded['pathspec']} "
                  f"(attempt {self._loaded['attempt']}, {manifest.created_on}), "
                  f"{len(manifest.files)} file(s), {size_text(manifest.total_bytes)}{gang}.")

    # -- gangs (see uploader.gang) ----------------------------------------------------

    def _declare(self, member: GangMember) -> None:
        """Before this rank's first save of the attempt returns, make it a participant."""
        if self._declared:
            return
        i = self._identity
        body = json.dumps({"rank": member.rank, "size": member.size, "attempt": i.attempt,
                           "task": i.pathspec, "host": socket.gethostname(),
                           "pid": os.getpid()}).encode()
        key = marker_key(self._scope.prefix, i.run_id, member, i.attempt)
        try:
            self._engine.run(self._engine.backend.put_bytes, key, body)
        except Exception as e:
            raise CheckpointUploadException(
                f"rank {member.rank} of the gang could not record that it saves checkpoints "
                f"({self._engine.backend.url_of(key)}): {e}. Nothing was saved; save() "
                "again once the store answers.") from e
        self._declared = True

    def _load_gang_on_start(self, policy: str, member: GangMember) -> None:
        """Every rank loads its part of one gang checkpoint, the one rank 0 chooses."""
        i, engine = self._identity, self._engine
        catalog = self._reader.home()
        key = decision_key(self._scope.prefix, i.run_id, member.gang_id, i.attempt)
        if member.rank == 0:
            resume, found = self._choose_for_gang(policy, member, catalog)
            engine.run(engine.backend.put_bytes, key, resume.to_json())
        else:
            resume, found = self._await_choice(key, member), None
        if resume.error:
            raise CheckpointException(resume.error)
        part = resume.key_for(member.rank)
        if found is None and part is not None:
            found = catalog.read(part)
            if found is None:
                raise CheckpointException(
                    f"rank {member.rank}: the gang checkpoint rank 0 chose to resume from has "
                    f"no committed part at {engine.backend.url_of(part)}; not starting from a "
                    "step other ranks may not have.")
            try:
                catalog.load(found, self._directory)
            except CheckpointError as e:
                raise CheckpointException(
                    f"rank {member.rank} could not load its part of the gang checkpoint the "
                    f"other ranks resume from: {e} Not starting from another step than "
                    "theirs.") from e
        if found is not None:
            self._loaded_from(catalog, found)

    def _choose_for_gang(self, policy: str, member: GangMember, catalog: Catalog
                         ) -> tuple[Resume, Entry | None]:
        """Rank 0: the newest gang checkpoint every participant committed (``eager``: of
        earlier runs too), loaded into this rank's directory."""
        i = self._identity
        candidates = catalog.select(self._scope.prefix, run_id=i.run_id,
                                    gang_id=member.gang_id, rank=0, latest_only=True)
        if policy == "eager":
            own = {e.keys for e in candidates}
            candidates += [e for e in catalog.select(self._scope.prefix, latest_only=True,
                                                     rank=0) if e.keys not in own]
        for entry in candidates:
            g = entry.gang
            if g is not None and g.maybe_torn_gang:
                silent = sorted(set(range(g.size)) - set(g.participants))
                self._log(f"note: not resuming from {entry.manifest.name!r} "
                          f"({entry.keys.checkpoint_id}): it is the first save of its attempt "
                          f"and rank(s) {silent} never recorded that they save, which is also "
                          "what ranks that died before their first save would leave. Trying "
                          "the one before it.")
                continue
            size, ranks = (1, [0]) if g is None else (g.size, sorted(g.parts))
            if size != member.size and not (g is None or set(g.participants) == {0}):
                return Resume({}, member.size, error=(
                    f"the newest gang checkpoint to resume from, {entry.manifest.name!r} of "
                    f"{entry.manifest.identity.get('pathspec')}, was saved by a gang of "
                    f"{size} ranks, and this gang has {member.size}: each rank's part is its "
                    "own shard, so it cannot be loaded by rank. Run with the same "
                    "num_parallel, or start afresh (load_policy='none').")), None
            found = self._load_first(catalog, [entry])
            if found is None:
                continue
            parts = {0: entry.keys.manifest} if g is None else {
                r: g.parts[r].keys.manifest for r in ranks}
            return Resume(parts, member.size), found
        return Resume({}, member.size), None

    def _await_choice(self, key: str, member: GangMember) -> Resume:
        """Ranks but 0: what rank 0 chose, once it has written it down."""
        engine = self._engine
        deadline = time.monotonic() + engine.settings.gang_timeout
        pause = 0.05
        while True:
            data = engine.run(engine.backend.get_bytes, key)
            if data is not None:
                return Resume.from_json(data)
            if time.monotonic() >= deadline:
                raise CheckpointException(
                    f"rank {member.rank} waited METAFLOW_CHECKPOINT_GANG_TIMEOUT="
                    f"{engine.settings.gang_timeout:g}s for rank 0 to choose the gang "
                    f"checkpoint every rank resumes from ({engine.backend.url_of(key)}); "
                    "rank 0 did not start, or cannot reach the store.")
            time.sleep(pause)  # a rendezvous through the store: nothing to wait on here
            pause = min(1.0, pause * 2)

    def _start_retention(self) -> None:
        """Prune this task's checkpoints (this run, every attempt) after each commit, and
        once more at its end (for what processes it started saved).

        In a gang, rank 0 prunes for every rank, keeping or deleting whole gang
        checkpoints; a process started by the task prunes after its own commits.
        """
        if self._retention is None or not self._retention[0].active:
            return
        if self._identity.gang is not None and self._identity.gang.rank != 0:
            return
        policy, grace_s = self._retention

        self._pruner = Pruner(self._engine, self._scope.prefix, policy,
                              run_id=self._identity.run_id, grace_s=grace_s,
                              protect=self._protected, log=self._log)

    def _protected(self) -> list[str]:
        # Never the one the task resumed from, even when no rule would keep it.
        loaded = self._loaded
        own = [] if loaded is None else [str(loaded.get("version_id", ""))]
        return own + self._inherited_protect

    def _load_legacy_on_start(self, policy: str, identifier: str | None) -> None:
        from ..shared import legacy

        i, engine = self._identity, self._engine
        candidates: list[tuple[str, Callable[[], legacy.LegacyEntry | None]]] = [
            ("this task", lambda: legacy.latest_for_task(engine, i.pathspec))]
        if policy == "eager" and identifier is not None:
            candidates.append(("this step and foreach branch", lambda: legacy.latest_for_scope(
                engine, flow=i.flow, step=i.step, namespace=i.namespace,
                identifier=identifier)))
        tried: set[str] = set()
        failed = False
        for n, (what, find) in enumerate(candidates):
            try:
                entry = find()
                if entry is None or entry.key in tried:
                    continue
                tried.add(entry.key)
                legacy.load(engine, entry, self._directory)
            except Exception as e:
                # Loud, but never a task that cannot start: that package's layout is read
                # in whatever state it was left, and any failure skips to the next one.
                self._clear_directory()
                failed = True
                why = str(e) if isinstance(e, CheckpointError | CheckpointException) else \
                    f"{type(e).__name__}: {e}"
                then = (f"looking for the one of {candidates[n + 1][0]}"
                        if n + 1 < len(candidates) else "no other is left")
                self._log(f"ERROR: could not load the metaflow-checkpoint checkpoint of {what}: "
                          f"{why} Resuming from it is skipped; {then}.")
                continue
            ref = CheckpointReference(entry.reference)
            self._loaded = ref
            self._log(f"No checkpoint of this package to resume from; loaded the latest "
                      f"checkpoint metaflow-checkpoint saved for {what}: {ref.get('name')!r} "
                      f"by {ref.get('pathspec')} (attempt {ref.get('attempt')}, "
                      f"{ref.get('created_on')}), key {entry.key}.")
            return
        if failed:
            self._log("No checkpoint could be loaded: the task starts without one.")

    def _finish(self, *, success: bool, artifacts: Mapping[str, Any] | None = None) -> None:
        """Drain pending uploads. On success, raise if a checkpoint failed for good.

        A torn checkpoint that no later save of its name replaced fails a successful
        step, naming the artifact that holds its reference. The one exception is the
        default name, whose content is "the step's latest state": its newest save is
        taken again now that the step has returned and nothing can change the files.
        A name the user chose ("best") is never given content other than what was saved.
        """
        # One deadline for everything below, the save taken again included.
        deadline = time.monotonic() + self._engine.settings.drain_timeout
        report = self._engine.drain(progress=self._report_drain)
        if success:
            defaults = [h for h in report.handles if h.name == DEFAULT_NAME]
            newest = defaults[-1] if defaults else None
            if newest is not None and newest.state is CheckpointState.TORN:
                if report.pending or time.monotonic() >= deadline:
                    self._log(f"ERROR: the newest checkpoint {newest.name!r} was torn, and "
                              "METAFLOW_CHECKPOINT_DRAIN_TIMEOUT leaves no time to save it "
                              "again.")
                else:
                    self._log(f"ERROR: the newest checkpoint {newest.name!r} was torn; saving "
                              f"{newest.source} again now that the step has finished.")
                    ref = newest.reference
                    try:
                        self.save(newest.source, name=newest.name,
                                  metadata=ref.get("metadata"), latest=True)
                    except CheckpointException as e:
                        self._log(f"ERROR: saving again failed: {e}")
                    report = self._engine.drain(max(0.0, deadline - time.monotonic()),
                                                progress=self._report_drain)
        self._commits.flush()
        if self._pruner is not None:
            self._pruner.request()  # what processes the task started committed
        if self._pruner is not None and not self._pruner.drain():
            self._log("note: a prune of old checkpoints was still running at the end of the "
                      "task and was left to the next one; checkpoints are unaffected.")
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
            self._log(f"{committed} of {len(report.handles)} {self._noun}(s) of this attempt "
                      "committed.")
        if problems:
            text = "\n".join(problems)
            if success:
                raise CheckpointUploadException(text)
            self._log("ERROR: " + text)

    def _report_drain(self, progress: DrainProgress) -> None:
        self._log(drain_line(progress))

    def _drain_for_signal(self, grace: float) -> None:
        """Commit what is pending within ``grace`` seconds; safe inside a signal handler."""
        report = self._engine.drain_for_signal(grace)
        self._commits.flush(blocking=False)
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
                      f"{self._noun}(s) of this attempt committed.")

    def _gang_card(self) -> str:
        """The card's table of this attempt's gang checkpoints, each rank's part's state."""
        from ..card.checkpoint_card import gang_markdown

        i, member = self._identity, self._identity.gang
        assert member is not None
        rows = []
        for e in self._reader.home().entries(self._scope.prefix, run_id=i.run_id,
                                             incomplete=True):
            g = e.gang
            if g is None or g.gang_id != member.gang_id or not g.step.startswith(
                    f"{i.attempt}/"):
                continue
            states = {r: "committed" if r in g.parts else "uploading"
                      for r in sorted(set(g.parts) | set(g.participants))}
            rows.append((g.step.rsplit("/", 1)[1], e.manifest.name, states))
        return gang_markdown(rows, size=member.size, rank=member.rank)

    def _handles(self) -> tuple[CheckpointHandle, ...]:
        """Every save of this attempt so far, oldest first; safe from any thread (the card)."""
        return self._engine.handles

    def _remove_files(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)
        shutil.rmtree(self._snapshot_dir, ignore_errors=True)
        if self._own_sequence and self._sequence.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._sequence.path)

    def _close(self) -> None:
        if self._pruner is not None:
            self._pruner.close()
        self._engine.close()
        self._reader.close()
        self._remove_files()

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def _check_save_args(name: Any, metadata: Any, latest: Any, storage_format: Any) -> None:
        if not isinstance(name, str) or not name:
            raise CheckpointException(f"save(name=...) must be a non-empty string, got {name!r}.")
        if metadata is not None and not isinstance(metadata, dict):
            raise CheckpointException(
                f"save(metadata=...) must be a dict, got {type(metadata).__name__}.")
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



__all__ = ["CheckpointState", "CurrentCheckpoint", "TaskIdentity"]
