"""Finding the checkpoints a ``checkpoint`` command names, in the flow's datastore.

A thin adapter over :class:`uploader.catalog.Catalog`, read through the engine
:class:`..shared.reader.Reader` builds for the flow's datastore (as ``current.checkpoint`` and
``Checkpoint`` read); a flow's scopes, and data no manifest commits, come from
:func:`uploader.inventory.take_inventory`. It turns what users type (a pathspec, a
checkpoint id, a manifest key) into catalog entries, and entries into rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from metaflow._vendor import click

from uploader import CheckpointError, CheckpointKeys, Scope, checkpoint_order
from uploader.catalog import Catalog, Entry
from uploader.gang import Gang
from uploader.inventory import Inventory, Uncommitted, take_inventory
from uploader.layout import ROOT_PREFIX, safe_component

from ..shared.exceptions import CheckpointException
from ..shared.reader import Reader
from ..shared.storage import SUPPORTED_DATASTORES, engine_settings

__all__ = ["CheckpointNotFoundException", "Session", "Target", "is_one_checkpoint"]

_UNORDERED = (-1, -1, -1)


class CheckpointNotFoundException(CheckpointException):
    headline = "No such checkpoint"


def is_one_checkpoint(which: str) -> bool:
    """Whether ``which`` names one checkpoint (a manifest key or an id), not a pathspec."""
    return "/manifests/" in which or ("/" not in which
                                      and checkpoint_order(which) != _UNORDERED)


def _warn(message: str) -> None:
    click.echo(f"[@checkpoint] {message}", err=True)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a PATHSPEC names within the flow: everything, a run, a step of it, or a task."""

    run: str | None = None
    step: str | None = None
    task: str | None = None

    @classmethod
    def parse(cls, text: str | None, flow: str) -> Target:
        """``[FLOW/]RUN[/STEP[/TASK]]``; a usage error for one of another flow."""
        if text is None or not text.strip("/"):
            return cls()
        parts = text.strip("/").split("/")
        if any(not p for p in parts):
            raise _not_a_pathspec(text, flow)
        named = _flow_named(parts, flow)
        if named == flow:
            parts = parts[1:]
        elif named is not None:
            case = (f" (flow names are case-sensitive: write {flow}/...)"
                    if named.lower() == flow.lower() else "")
            raise click.BadParameter(
                f"{text!r} names the flow {named}, but this is {flow}'s command line{case}; "
                f"run the checkpoint command of {named}'s file.", param_hint="PATHSPEC")
        if len(parts) > 3:
            raise _not_a_pathspec(text, flow)
        return cls(*parts)

    def label(self, flow: str) -> str:
        return "/".join([flow, *(p for p in (self.run, self.step, self.task) if p)])

    def has_scope(self, scope: str) -> bool:
        return self.step is None or Scope.from_prefix(scope).step == safe_component(self.step)

    def has_keys(self, keys: CheckpointKeys) -> bool:
        """Whether a checkpoint's keys lie under this target (the task read from its id)."""
        return (self.has_scope(keys.scope_prefix)
                and (self.run is None or keys.run_id == safe_component(self.run))
                and (self.task is None or _id_task(keys.checkpoint_id) == safe_component(
                    self.task)))


def _not_a_pathspec(text: str, flow: str) -> click.BadParameter:
    return click.BadParameter(
        f"{text!r} is not a pathspec of {flow}: write RUN, RUN/STEP or RUN/STEP/TASK "
        f"(optionally after {flow}/).", param_hint="PATHSPEC")


def _flow_named(parts: Sequence[str], flow: str) -> str | None:
    """The flow a pathspec's first component names; None where it is a run id.

    A flow's name is a Python class name, compared case-sensitively. A run id is digits
    on the local metadata and ``sfn-...``, ``argo-...`` and the like on a scheduler: never
    an identifier, except an id given by hand (``resume --run-id``). So a first component
    that is no identifier is a run; one is a flow when it is this flow's name in any case,
    when four components follow the flow's shape (FLOW/RUN/STEP/TASK), when the second is
    no step name (steps are identifiers: ``myflow/123`` is a flow and a run), or when it
    is capitalised as classes are.
    """
    first = parts[0]
    if first == flow:
        return flow
    if not first.isidentifier():
        return None
    if (first.lower() == flow.lower() or len(parts) == 4
            or (len(parts) > 1 and not parts[1].isidentifier()) or first[0].isupper()):
        return first
    return None


def _id_task(checkpoint_id: str) -> str:
    """The task component of an id this package wrote (see ``new_checkpoint_id``)."""
    head = checkpoint_id.rsplit("-", 3)[0]
    return head.partition("-")[2]


def _newest_first(entries: Iterable[Entry]) -> list[Entry]:
    by_keys = {e.keys: e for e in entries}
    return [by_keys[k] for k in CheckpointKeys.newest_first(by_keys)]


class Session:
    """One command's view of the flow's checkpoints: a store, a namespace, a catalog."""

    def __init__(self, *, flow: str, datastore: str, root: str, namespace: str | None) -> None:
        if datastore not in SUPPORTED_DATASTORES:
            raise CheckpointException(
                f"checkpoints are stored in the {' or '.join(SUPPORTED_DATASTORES)} datastore; "
                f"this command runs with {datastore!r}. Pass "
                f"--datastore={' or --datastore='.join(SUPPORTED_DATASTORES)} before "
                "`checkpoint`.")
        self.flow, self.namespace = flow, namespace
        self.datastore, self.root = datastore, root
        self.reader = Reader(settings=engine_settings(), log=_warn)
        self._inventory: Inventory | None = None

    @classmethod
    def from_cli(cls, obj: Any, *, namespace: str | None, all_namespaces: bool) -> Session:
        """For the flow Metaflow's CLI was started with, and its ``--datastore`` options."""
        if namespace is not None and all_namespaces:
            raise click.UsageError("--namespace and --all-namespaces exclude each other.")
        if namespace is None and not all_namespaces:
            from metaflow import get_namespace

            namespace = get_namespace()  # None is Metaflow's global namespace: all
        impl = obj.datastore_impl
        return cls(flow=obj.flow.name, datastore=impl.TYPE, root=str(impl.datastore_root),
                   namespace=namespace)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.reader.close()

    # -- finding ---------------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        return self.reader.catalog(self.datastore, self.root)

    @property
    def prefix(self) -> str:
        head = f"{ROOT_PREFIX}/{safe_component(self.flow)}/"
        return head if self.namespace is None else f"{head}{safe_component(self.namespace)}/"

    def where(self) -> str:
        ns = "any namespace" if self.namespace is None else f"namespace {self.namespace}"
        return f"in {ns} of {self.catalog.engine.backend.url}"

    def hint(self) -> str:
        return ("" if self.namespace is None
                else " Checkpoints of other namespaces are listed with --all-namespaces.")

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        try:
            yield
        except CheckpointError as e:
            raise CheckpointException(f"cannot read checkpoints {self.where()}: {e}") from e

    def inventory(self) -> Inventory:
        if self._inventory is None:
            with self.reading():
                self._inventory = take_inventory(self.catalog.engine, self.prefix)
        return self._inventory

    def committed(self, target: Target) -> list[Entry]:
        """Every committed checkpoint under ``target``, newest first."""
        found: list[Entry] = []
        with self.reading():
            for scope in self.inventory().scopes:
                if target.has_scope(scope):
                    found += self.catalog.select(scope, run_id=target.run, task_id=target.task)
        return _newest_first(found)

    def incomplete_gangs(self, target: Target) -> list[Entry]:
        """Gang checkpoints under ``target`` some rank has not committed its part of."""
        found: list[Entry] = []
        with self.reading():
            for scope in self.inventory().scopes:
                if target.has_scope(scope):
                    found += [e for e in self.catalog.entries(scope, run_id=target.run,
                                                              incomplete=True)
                              if e.gang is not None and not e.gang.complete
                              and (target.task is None or any(
                                  p.task_id == target.task for p in e.gang.parts.values()))]
        return _newest_first(found)

    def uncommitted(self, target: Target, committed: Sequence[Entry]) -> list[Uncommitted]:
        """Data without a manifest under ``target``; not what a later checkpoint (format 2)
        still reads, which stays after its own manifest is deleted."""
        used = {f"{e.keys.scope_prefix}/{f.key}" for e in committed for f in e.manifest.files
                if f.key is not None}
        return [u for u in self.inventory().uncommitted
                if target.has_keys(u.keys) and not any(o.key in used for o in u.objects)]

    def manifest_key(self, which: str) -> str | None:
        """The manifest key ``which`` names, when it is one or a URL in this store (of a
        manifest, or of a checkpoint's data, as ``list`` and ``show`` print them)."""
        url = self.catalog.engine.backend.url
        base = url.rstrip("/") + "/"
        if "://" in which and not which.startswith(base):
            raise click.BadParameter(
                f"{which!r} is not in this flow's store, {url}: give a URL under it, or "
                "pass the --datastore and --datastore-root of the store it is in.",
                param_hint="CHECKPOINT")
        in_store = which.startswith(base)
        key = which[len(base):] if in_store else which
        if "/manifests/" in key:
            return key
        if not in_store:
            return None
        # <scope: 5 components>/data/<run>/<checkpoint id>[/<path>]
        parts = key.split("/")
        if len(parts) >= 8 and parts[5] == "data" and parts[6] and parts[7]:
            return f"{'/'.join(parts[:5])}/manifests/{parts[6]}/{parts[7]}.json"
        raise click.BadParameter(
            f"{which!r} is in this store, but not the URL of a checkpoint: give the URL of "
            "its manifest or of its data, as `list --json` and `show` print them.",
            param_hint="CHECKPOINT")

    def names_one(self, which: str) -> bool:
        """Whether ``which`` names one checkpoint (a manifest key, a URL or an id), not a
        pathspec."""
        return is_one_checkpoint(which) or self.manifest_key(which) is not None

    def resolve(self, which: str, *, name: str | None = None) -> Entry:
        """The checkpoint ``which`` names: a manifest key, its URL or its data's, a
        checkpoint id, or a pathspec (its newest checkpoint, of ``name`` if given)."""
        key = self.manifest_key(which)
        if key is not None:
            try:
                with self.reading():
                    entry = self.catalog.read(key, with_gang=True)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="CHECKPOINT") from e
            if entry is None:
                raise CheckpointNotFoundException(
                    f"no committed checkpoint has the manifest key {key!r} in "
                    f"{self.catalog.engine.backend.url}.")
            return entry
        if is_one_checkpoint(which):
            return self._by_id(which)
        target = Target.parse(which, self.flow)
        found = [e for e in self.committed(target) if name is None or e.manifest.name == name]
        if not found:
            named = "" if name is None else f" named {name!r}"
            raise CheckpointNotFoundException(
                f"{target.label(self.flow)} has no committed checkpoint{named} "
                f"{self.where()}.{self.hint()}")
        return found[0]

    def _by_id(self, checkpoint_id: str) -> Entry:
        inv = self.inventory()
        for keys in inv.manifests:
            if keys.checkpoint_id == checkpoint_id:
                with self.reading():
                    entry = self.catalog.read(keys.manifest, with_gang=True)
                if entry is not None:
                    return entry
        if any(u.keys.checkpoint_id == checkpoint_id for u in inv.uncommitted):
            raise CheckpointNotFoundException(
                f"checkpoint {checkpoint_id} has data but no manifest {self.where()}: it was "
                "never committed (an upload in flight, or one that crashed), and nothing "
                "loads it.")
        raise CheckpointNotFoundException(
            f"{self.flow} has no checkpoint {checkpoint_id} {self.where()}.{self.hint()}")

    # -- rows --------------------------------------------------------------------------

    def row(self, e: Entry) -> dict[str, Any]:
        """One checkpoint; a gang checkpoint's sizes are those of all its parts."""
        m, ident = e.manifest, e.manifest.identity
        parts = [e] if e.gang is None else list(e.gang.parts.values())
        files = [f for p in parts for f in p.manifest.files]
        size = sum(f.size for f in files)
        stored = sum(f.size for f in files if f.key is None)
        step = str(ident.get("step") or Scope.from_prefix(e.keys.scope_prefix).step)
        backend = self.catalog.engine.backend
        complete = e.gang is None or e.gang.complete
        return {
            "state": "committed" if complete else "incomplete",
            "name": m.name, "checkpoint_id": e.keys.checkpoint_id,
            "pathspec": f"{self.flow}/{m.run_id}/{step}/{e.task_id}", "run_id": m.run_id,
            "step": step, "task_id": e.task_id, "attempt": e.attempt,
            "namespace": ident.get("namespace"), "files": len(files),
            "size_bytes": size, "stored_bytes": stored,
            "referenced_bytes": size - stored, "created_on": m.created_on,
            "committed_on": m.committed_on, "written_on": None, "latest": m.latest,
            "metadata": m.metadata,
            "key": e.keys.manifest, "url": backend.url_of(e.keys.data_prefix),
            "gang": None if e.gang is None else gang_row(e.gang),
        }

    def uncommitted_row(self, u: Uncommitted) -> dict[str, Any]:
        keys = u.keys
        attempt, _seq, us = checkpoint_order(keys.checkpoint_id)
        step = Scope.from_prefix(keys.scope_prefix).step
        task = _id_task(keys.checkpoint_id)
        created = (None if us < 0 else datetime.datetime.fromtimestamp(
            us / 1e6, datetime.UTC).isoformat())
        return {
            "state": "incomplete", "name": None, "checkpoint_id": keys.checkpoint_id,
            "pathspec": f"{self.flow}/{keys.run_id}/{step}/{task}", "run_id": keys.run_id,
            "step": step, "task_id": task, "attempt": attempt, "namespace": None,
            "files": len(u.objects), "size_bytes": u.size, "stored_bytes": u.size,
            "referenced_bytes": 0, "created_on": created, "committed_on": None,
            "written_on": datetime.datetime.fromtimestamp(u.mtime, datetime.UTC).isoformat(),
            "latest": None, "metadata": None, "key": None,
            "url": self.catalog.engine.backend.url_of(keys.data_prefix), "gang": None,
        }


def gang_row(g: Gang) -> dict[str, Any]:
    """A gang checkpoint's ranks and the state of each one's part."""
    ranks: dict[str, Any] = {}
    for r in sorted(set(g.parts) | set(g.participants)):
        p = g.parts.get(r)
        ranks[str(r)] = {"state": "missing", "checkpoint_id": None, "task_id": None} \
            if p is None else {"state": "committed", "checkpoint_id": p.keys.checkpoint_id,
                               "task_id": p.task_id}
    return {"size": g.size, "step": g.step, "complete": g.complete, "missing": g.missing,
            "ranks": ranks}
