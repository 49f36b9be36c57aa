"""What ``python flow.py checkpoint ...`` does: a thin adapter from the command line to
the catalog.

Reading goes through :class:`uploader.catalog.Catalog`, over the engine
:class:`.reader.Reader` builds for the flow's datastore, as ``current.checkpoint`` and
``Checkpoint`` read; a flow's scopes (and data no manifest commits) are found with
:func:`uploader.inventory.take_inventory`. This module parses what users type and formats
what comes back. Failures that are the store's answer (nothing there, a corrupt file) exit
1 with a message; usage errors are click's (exit 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from metaflow._vendor import click

from uploader import CheckpointError, CheckpointKeys, ManifestError, Scope, checkpoint_order
from uploader.catalog import Catalog, Entry
from uploader.inventory import Inventory, Uncommitted, take_inventory
from uploader.layout import ROOT_PREFIX, safe_component

from .exceptions import CheckpointException
from .reader import Reader
from .storage import SUPPORTED_DATASTORES, engine_settings

__all__ = ["CheckpointNotFoundException", "Session", "Target"]

# Files `verify` reads back at once. Each lands in a scratch file that is removed once
# checked, so this bounds the disk it needs as well as the files in flight (a large
# file's own ranges are fetched concurrently by the engine).
VERIFY_WORKERS = 4
# How often a download's progress bar is redrawn.
PROGRESS_INTERVAL_S = 0.2
_UNORDERED = (-1, -1, -1)


class CheckpointNotFoundException(CheckpointException):
    headline = "No such checkpoint"


class CheckpointDownloadException(CheckpointException):
    headline = "Checkpoint download failed"


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
        if text is None or not text.strip("/"):
            return cls()
        parts = text.strip("/").split("/")
        if parts[0] == flow:
            parts = parts[1:]
        if len(parts) > 3 or any(not p for p in parts):
            raise click.BadParameter(
                f"{text!r} is not a pathspec of {flow}: write RUN, RUN/STEP or RUN/STEP/TASK "
                f"(optionally after {flow}/).", param_hint="PATHSPEC")
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


def _id_task(checkpoint_id: str) -> str:
    """The task component of an id this package wrote (see ``new_checkpoint_id``)."""
    head = checkpoint_id.rsplit("-", 3)[0]
    return head.partition("-")[2]


def _newest_first(entries: Iterable[Entry]) -> list[Entry]:
    by_keys = {e.keys: e for e in entries}
    return [by_keys[k] for k in CheckpointKeys.newest_first(by_keys)]


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        t = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.UTC)
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


class _Bar:
    """Click's progress bar on stderr, or nothing."""

    def __init__(self, total: int, label: str, *, enabled: bool) -> None:
        self._cm: Any = (click.progressbar(length=total, label=label, file=sys.stderr)
                         if enabled and total > 0 else None)
        self._bar: Any = None

    def __enter__(self) -> _Bar:
        if self._cm is not None:
            self._bar = self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)

    def update(self, n: int) -> None:
        if self._bar is not None and n > 0:
            self._bar.update(n)


def _staging(directory: str) -> set[str]:
    """The staging directories loads into ``directory`` have made (see ``Engine.load``)."""
    return set(glob.glob(os.path.join(glob.escape(directory), ".ckpt-load-*")))


def _staged_bytes(dirs: Iterable[str]) -> int:
    """Bytes loads have written so far into their staging directories ``dirs``."""
    total = 0
    for d in dirs:
        for base, _dirs, files in os.walk(d):
            for f in files:
                with contextlib.suppress(OSError):  # renamed into place meanwhile
                    st = os.stat(os.path.join(base, f))
                    # A ranged download writes at offsets: count what is allocated.
                    total += min(st.st_size, st.st_blocks * 512)
    return total


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


class Session:
    """One command's view of the flow's checkpoints: a store, a namespace, a catalog."""

    def __init__(self, *, flow: str, datastore: str, root: str, namespace: str | None) -> None:
        if datastore not in SUPPORTED_DATASTORES:
            raise CheckpointException(
                f"checkpoints are stored in the {' or '.join(SUPPORTED_DATASTORES)} datastore; "
                f"this command runs with {datastore!r}. Pass --datastore=local or "
                "--datastore=s3 before `checkpoint`.")
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

    def _hint(self) -> str:
        return ("" if self.namespace is None
                else " Checkpoints of other namespaces are listed with --all-namespaces.")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        try:
            yield
        except CheckpointError as e:
            raise CheckpointException(f"cannot read checkpoints {self.where()}: {e}") from e

    def inventory(self) -> Inventory:
        if self._inventory is None:
            with self._reading():
                self._inventory = take_inventory(self.catalog.engine, self.prefix)
        return self._inventory

    def committed(self, target: Target) -> list[Entry]:
        """Every committed checkpoint under ``target``, newest first."""
        found: list[Entry] = []
        with self._reading():
            for scope in self.inventory().scopes:
                if target.has_scope(scope):
                    found += self.catalog.select(scope, run_id=target.run, task_id=target.task)
        return _newest_first(found)

    def uncommitted(self, target: Target, committed: Sequence[Entry]) -> list[Uncommitted]:
        """Data without a manifest under ``target``; not what a later checkpoint (format 2)
        still reads, which stays after its own manifest is deleted."""
        used = {f"{e.keys.scope_prefix}/{f.key}" for e in committed for f in e.manifest.files
                if f.key is not None}
        return [u for u in self.inventory().uncommitted
                if target.has_keys(u.keys) and not any(o.key in used for o in u.objects)]

    def resolve(self, which: str, *, name: str | None = None) -> Entry:
        """The checkpoint ``which`` names: a manifest key, a checkpoint id, or a pathspec
        (its newest checkpoint, of ``name`` if given)."""
        if "/manifests/" in which:
            try:
                with self._reading():
                    entry = self.catalog.read(which)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="CHECKPOINT") from e
            if entry is None:
                raise CheckpointNotFoundException(
                    f"no committed checkpoint has the manifest key {which!r} in "
                    f"{self.catalog.engine.backend.url}.")
            return entry
        if "/" not in which and checkpoint_order(which) != _UNORDERED:
            return self._by_id(which)
        target = Target.parse(which, self.flow)
        found = [e for e in self.committed(target) if name is None or e.manifest.name == name]
        if not found:
            named = "" if name is None else f" named {name!r}"
            raise CheckpointNotFoundException(
                f"{target.label(self.flow)} has no committed checkpoint{named} "
                f"{self.where()}.{self._hint()}")
        return found[0]

    def _by_id(self, checkpoint_id: str) -> Entry:
        inv = self.inventory()
        for keys in inv.manifests:
            if keys.checkpoint_id == checkpoint_id:
                with self._reading():
                    entry = self.catalog.read(keys.manifest)
                if entry is not None:
                    return entry
        if any(u.keys.checkpoint_id == checkpoint_id for u in inv.uncommitted):
            raise CheckpointNotFoundException(
                f"checkpoint {checkpoint_id} has data but no manifest {self.where()}: it was "
                "never committed (an upload in flight, or one that crashed), and nothing "
                "loads it.")
        raise CheckpointNotFoundException(
            f"{self.flow} has no checkpoint {checkpoint_id} {self.where()}.{self._hint()}")

    # -- rows --------------------------------------------------------------------------

    def row(self, e: Entry) -> dict[str, Any]:
        m, ident = e.manifest, e.manifest.identity
        stored = sum(f.size for f in m.files if f.key is None)
        step = str(ident.get("step") or Scope.from_prefix(e.keys.scope_prefix).step)
        backend = self.catalog.engine.backend
        return {
            "state": "committed", "name": m.name, "checkpoint_id": e.keys.checkpoint_id,
            "pathspec": f"{self.flow}/{m.run_id}/{step}/{e.task_id}", "run_id": m.run_id,
            "step": step, "task_id": e.task_id, "attempt": e.attempt,
            "namespace": ident.get("namespace"), "files": len(m.files),
            "size_bytes": m.total_bytes, "stored_bytes": stored,
            "referenced_bytes": m.total_bytes - stored, "created_on": m.created_on,
            "committed_on": m.committed_on, "latest": m.latest, "metadata": m.metadata,
            "key": e.keys.manifest, "url": backend.url_of(e.keys.data_prefix),
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
            "url": self.catalog.engine.backend.url_of(keys.data_prefix),
        }

    def _print_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        refs = any(r["referenced_bytes"] for r in rows)
        headers = ["NAME", "RUN/STEP/TASK", "ATTEMPT", "CHECKPOINT ID", "SIZE"]
        headers += ["STORED"] if refs else []
        headers += ["CREATED (UTC)", "STATE"]
        headers += ["NAMESPACE"] if self.namespace is None else []
        table = []
        for r in rows:
            cells = [r["name"] or "-", r["pathspec"].split("/", 1)[1], str(r["attempt"]),
                     r["checkpoint_id"], _size(r["size_bytes"])]
            cells += [_size(r["stored_bytes"])] if refs else []
            cells += [_when(r["created_on"]), r["state"]]
            cells += [r["namespace"] or "-"] if self.namespace is None else []
            table.append(cells)
        _table(headers, table)

    # -- commands ----------------------------------------------------------------------

    def list_checkpoints(self, pathspec: str | None, *, name: str | None, incomplete: bool,
             as_json: bool) -> None:
        target = Target.parse(pathspec, self.flow)
        entries = self.committed(target)
        shown = [e for e in entries if name is None or e.manifest.name == name]
        rows = [(e.keys, self.row(e)) for e in shown]
        if incomplete and name is None:
            # What a later checkpoint still reads may lie in another run of the scope.
            scoped = entries if target.run is None else self.committed(
                Target(step=target.step))
            rows += [(u.keys, self.uncommitted_row(u))
                     for u in self.uncommitted(target, scoped)]
        if not rows:
            named = "" if name is None else f" named {name!r}"
            raise CheckpointNotFoundException(
                f"{target.label(self.flow)} has no checkpoints{named} {self.where()}."
                f"{self._hint()}")
        by_keys = dict(rows)
        ordered = [by_keys[k] for k in CheckpointKeys.newest_first(by_keys)]
        if as_json:
            click.echo(json.dumps({
                "flow": self.flow, "namespace": self.namespace, "datastore": self.datastore,
                "datastore_root": self.catalog.engine.backend.url, "checkpoints": ordered,
            }, indent=1))
            return
        self._print_rows(ordered)
        n = sum(1 for r in ordered if r["state"] == "committed")
        total = sum(r["size_bytes"] or 0 for r in ordered)
        click.echo(f"{_n(n, 'committed checkpoint')}, {_size(total)}, of "
                   f"{target.label(self.flow)} {self.where()}.")

    def show(self, which: str, *, name: str | None, as_json: bool) -> None:
        entry = self.resolve(which, name=name)
        m, r = entry.manifest, self.row(entry)
        backend = self.catalog.engine.backend
        if as_json:
            click.echo(json.dumps({"key": r["key"], "url": r["url"],
                                   "manifest": json.loads(m.to_json())}, indent=1))
            return
        click.echo(f"Checkpoint {m.name!r} {entry.keys.checkpoint_id}")
        fields = [
            ("task", f"{r['pathspec']} (attempt {r['attempt']}, namespace {r['namespace']})"),
            ("key", r["key"]), ("url", r["url"]),
            ("created", f"{_when(m.created_on)} UTC"),
            ("committed", f"{_when(m.committed_on)} UTC"),
            ("latest", "yes" if m.latest else "no (saved with latest=False)"),
            ("size", f"{_n(len(m.files), 'file')}, {_size(m.total_bytes)}"
                     + (f" ({_size(r['stored_bytes'])} stored by this checkpoint, the rest "
                        "in earlier ones)" if r["referenced_bytes"] else "")),
            ("format", str(m.format)),
            ("metadata", json.dumps(m.metadata, sort_keys=True)),
        ]
        for label, value in fields:
            click.echo(f"  {label:<10} {value}")
        click.echo("  files")
        rows = []
        for f in m.files:
            where = "" if f.key is None else backend.url_of(
                entry.keys.stored(f.path, f.key))
            rows.append(["   ", _size(f.size), f.sha256, f.path, where])
        _table(["   ", "SIZE", "SHA-256", "PATH", "STORED IN (IF EARLIER)" if any(
            r[4] for r in rows) else ""], rows)

    def download(self, which: str, directory: str, *, name: str | None,
                 progress: bool) -> None:
        entry = self.resolve(which, name=name)
        m, dest = entry.manifest, os.path.abspath(directory)
        before = _staging(dest)
        failed: list[BaseException] = []
        done = threading.Event()

        def load() -> None:
            try:
                self.catalog.load(entry, dest)
            except BaseException as e:
                failed.append(e)
            finally:
                done.set()

        worker = threading.Thread(target=load, name="checkpoint-download", daemon=True)
        worker.start()
        label = f"Downloading {m.name!r} ({_n(len(m.files), 'file')}, {_size(m.total_bytes)})"
        with _Bar(m.total_bytes, label, enabled=progress) as bar:
            shown = 0
            while not done.wait(PROGRESS_INTERVAL_S):
                now = min(_staged_bytes(_staging(dest) - before), m.total_bytes)
                bar.update(now - shown)
                shown = max(shown, now)
            if not failed:
                bar.update(m.total_bytes - shown)
        worker.join()
        if failed:
            e = failed[0]
            if isinstance(e, CheckpointError):
                raise CheckpointDownloadException(
                    f"{e}\nNothing was placed in {dest!r}.") from e
            raise e
        click.echo(f"Downloaded checkpoint {m.name!r} ({entry.keys.checkpoint_id}) into "
                   f"{dest}: {_n(len(m.files), 'file')}, "
                   f"{_size(m.total_bytes)}, every SHA-256 verified.")

    def _to_verify(self, which: str | None, name: str | None
                   ) -> tuple[list[Entry], list[CheckpointKeys]]:
        """The checkpoints to verify, and the manifests under the target that cannot be read."""
        if which is not None and ("/manifests/" in which or (
                "/" not in which and checkpoint_order(which) != _UNORDERED)):
            return [self.resolve(which)], []
        target = Target.parse(which, self.flow)
        entries = self.committed(target)
        read = {e.keys for e in entries}
        unread = [] if name is not None else [
            k for k in self.inventory().manifests if target.has_keys(k) and k not in read]
        return [e for e in entries if name is None or e.manifest.name == name], unread

    def verify(self, which: str | None, *, name: str | None, as_json: bool,
               progress: bool) -> None:
        entries, unread = self._to_verify(which, name)
        if not entries and not unread:
            named = "" if name is None else f" named {name!r}"
            label = Target.parse(which, self.flow).label(self.flow)
            raise CheckpointNotFoundException(
                f"{label} has no committed checkpoints{named} {self.where()}.{self._hint()}")
        catalog = self.catalog  # made here, not by the threads below
        engine = catalog.engine
        failures: list[dict[str, Any]] = []
        for keys in unread:
            try:
                engine.read_manifest(keys)  # None: deleted since it was listed
            except ManifestError as e:
                failures.append({"checkpoint_id": keys.checkpoint_id, "name": None,
                                 "key": keys.manifest, "file": None, "data_key": None,
                                 "error": f"the manifest {engine.backend.url_of(keys.manifest)} "
                                          f"cannot be read: {e}"})
            except CheckpointError as e:
                raise CheckpointException(f"cannot read checkpoints {self.where()}: {e}") from e
        jobs = [(e, f) for e in entries for f in e.manifest.files]
        total = sum(f.size for _, f in jobs)
        # Sizes from the store's listing, not from what a read returns: a ranged read asks
        # for the manifest's size and would not see bytes appended to an object.
        sizes: dict[str, int] = {}
        with self._reading():
            for scope in sorted({e.keys.scope_prefix for e in entries}):
                objects = engine.run(engine.backend.list_objects, f"{scope}/data/")
                sizes.update((o.key, o.size) for o in objects)
        scratch = tempfile.mkdtemp(prefix="metaflow_checkpoint_verify_")

        def check(i: int, entry: Entry, f: Any) -> str | None:
            key = entry.keys.stored(f.path, f.key)
            who = (f"checkpoint {entry.manifest.name!r} ({entry.keys.checkpoint_id}): file "
                   f"{f.path!r} at {engine.backend.url_of(key)}")
            if key not in sizes:
                return f"{who} is missing from the store."
            if sizes[key] != f.size:
                return f"{who} has {sizes[key]} bytes, but its manifest says {f.size}."
            # One file at a time, through the engine's own verified load.
            d = os.path.join(scratch, str(i))
            one = Entry(entry.keys, dataclasses.replace(entry.manifest, files=(f,)))
            try:
                catalog.load(one, d)
                return None
            except CheckpointError as e:
                return str(e)
            finally:
                shutil.rmtree(d, ignore_errors=True)

        try:
            with ThreadPoolExecutor(VERIFY_WORKERS) as pool, \
                    _Bar(total, f"Verifying {_n(len(entries), 'checkpoint')} ({_size(total)})",
                         enabled=progress) as bar:
                futures = {pool.submit(check, i, e, f): (e, f) for i, (e, f) in enumerate(jobs)}
                pending, done_bytes, shown = set(futures), 0, 0
                while pending:
                    finished, pending = wait(pending, timeout=PROGRESS_INTERVAL_S,
                                             return_when=FIRST_COMPLETED)
                    for fut in finished:
                        e, f = futures[fut]
                        done_bytes += f.size
                        error = fut.result()
                        if error is not None:
                            failures.append({
                                "checkpoint_id": e.keys.checkpoint_id, "name": e.manifest.name,
                                "key": e.keys.manifest, "file": f.path,
                                "data_key": e.keys.stored(f.path, f.key), "error": error})
                    staged = _staged_bytes(set().union(*(
                        _staging(d) for d in glob.glob(os.path.join(glob.escape(scratch), "*")))))
                    now = min(total, done_bytes + staged)
                    bar.update(now - shown)
                    shown = max(shown, now)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        failures.sort(key=lambda x: (x["key"], x["file"] or ""))
        bad = {x["key"] for x in failures}
        summary = (f"Verified {_n(len(entries), 'checkpoint')} ({_n(len(jobs), 'file')}, "
                   f"{_size(total)}) {self.where()}: ")
        summary += (f"{_n(len(failures), 'failure')} in {_n(len(bad), 'checkpoint')}."
                    if failures else "all intact.")
        if as_json:
            click.echo(json.dumps({
                "ok": not failures, "checkpoints": len(entries), "files": len(jobs),
                "bytes": total, "failures": failures,
                "verified": [{"checkpoint_id": e.keys.checkpoint_id, "name": e.manifest.name,
                              "key": e.keys.manifest, "ok": e.keys.manifest not in bad}
                             for e in entries],
            }, indent=1))
        else:
            for x in failures:
                click.echo(f"FAILED  {x['error']}")
            click.echo(summary)
        if failures:
            click.get_current_context().exit(1)

    def prune(self, pathspec: str | None, *, keep_last: int | None, keep_best: int | None,
              best_metric: str | None, best_mode: str, protect: Sequence[str],
              grace: float | None, dry_run: bool, as_json: bool) -> None:
        try:
            from uploader.retention import (
                DEFAULT_GRACE_S,
                RetentionPolicy,
                execute_prune,
                plan_prune,
            )
        except ImportError as e:
            raise CheckpointException(
                f"prune needs uploader.retention, which this installation lacks ({e}); "
                "install a release of metaflow-async-checkpoint that has it.") from e

        if keep_last is None and keep_best is None:
            raise click.UsageError("prune needs a rule: --keep-last N, --keep-best N "
                                   "--best-metric KEY, or both.")
        try:
            policy = RetentionPolicy(keep_last=keep_last, keep_best=keep_best,
                                     best_metric=best_metric, best_mode=best_mode)
        except ValueError as e:
            raise click.UsageError(str(e)) from e
        target = Target.parse(pathspec, self.flow)
        if target.task is not None:
            raise click.BadParameter(
                "prune keeps and deletes per scope (a step, or one foreach branch of it): "
                "give RUN or RUN/STEP, not a task.", param_hint="PATHSPEC")
        inv = self.inventory()
        scopes = [s for s in inv.scopes if target.has_scope(s)]
        if target.run is not None:  # the scopes where the run saved something
            keys = [*inv.manifests, *(u.keys for u in inv.uncommitted)]
            scopes = [s for s in scopes if any(
                k.scope_prefix == s and target.has_keys(k) for k in keys)]
        if not scopes:
            raise CheckpointNotFoundException(
                f"{target.label(self.flow)} has no checkpoints {self.where()}.{self._hint()}")
        plans = []
        with self._reading():
            for scope in scopes:
                plans.append((scope, plan_prune(
                    self.catalog, scope, policy, run_id=target.run, protect=protect,
                    grace_s=DEFAULT_GRACE_S if grace is None else grace)))
        reports = []
        if not dry_run:
            with self._reading():
                reports = [execute_prune(self.catalog, plan) for _, plan in plans]
        errors = [err for r in reports for err in r.errors]
        if as_json:
            click.echo(json.dumps({
                "dry_run": dry_run, "flow": self.flow, "namespace": self.namespace,
                "scopes": [self._plan_json(scope, plan) for scope, plan in plans],
                "deleted": None if dry_run else {
                    "checkpoints": sum(r.checkpoints_deleted for r in reports),
                    "objects": sum(r.objects_deleted for r in reports),
                    "bytes": sum(r.bytes_freed for r in reports),
                    "debris": sum(r.debris_removed for r in reports),
                    "uploads_aborted": sum(r.uploads_aborted for r in reports),
                    "errors": errors},
            }, indent=1))
        else:
            for scope, plan in plans:
                self._print_plan(scope, plan, dry_run=dry_run)
            if dry_run:
                n = sum(len(p.delete) for _, p in plans)
                click.echo(f"Dry run: would delete {_n(n, 'checkpoint')} "
                           f"({_size(sum(self._own_bytes(p.delete) for _, p in plans))}); "
                           "nothing was deleted.")
            else:
                for err in errors:
                    click.echo(f"ERROR  {err}")
                click.echo(
                    f"Deleted {_n(sum(r.checkpoints_deleted for r in reports), 'checkpoint')} "
                    f"({_n(sum(r.objects_deleted for r in reports), 'object')}, "
                    f"{_size(sum(r.bytes_freed for r in reports))} freed); removed the data "
                    f"of {_n(sum(r.debris_removed for r in reports), 'incomplete checkpoint')}; "
                    f"aborted {_n(sum(r.uploads_aborted for r in reports), 'multipart upload')}.")
        if errors:
            click.get_current_context().exit(1)

    @staticmethod
    def _own_bytes(entries: Iterable[Entry]) -> int:
        return sum(f.size for e in entries for f in e.manifest.files if f.key is None)

    def _plan_json(self, scope: str, plan: Any) -> dict[str, Any]:
        def ids(entries: Iterable[Entry]) -> list[dict[str, Any]]:
            return [{"checkpoint_id": e.keys.checkpoint_id, "name": e.manifest.name,
                     "key": e.keys.manifest,
                     "reason": plan.reasons.get(e.keys.checkpoint_id)} for e in entries]

        return {"scope": scope, "keep": ids(plan.keep), "delete": ids(plan.delete),
                "debris": list(plan.debris), "uploads": [list(u) for u in plan.uploads]}

    def _print_plan(self, scope: str, plan: Any, *, dry_run: bool) -> None:
        click.echo(f"{scope}: keep {len(plan.keep)}, "
                   f"{'would delete' if dry_run else 'delete'} {len(plan.delete)}")
        rows = []
        for verb, entries in (("keep", plan.keep), ("delete", plan.delete)):
            for e in entries:
                r = self.row(e)
                rows.append(["  " + verb, r["checkpoint_id"], r["name"],
                             r["pathspec"].split("/", 1)[1], _size(r["size_bytes"]),
                             plan.reasons.get(e.keys.checkpoint_id, "")])
        for prefix in plan.debris:
            rows.append(["  debris", prefix, "-", "-", "?", "data without a manifest"])
        for key, upload_id in plan.uploads:
            rows.append(["  abort", key, "-", "-", "?", f"multipart upload {upload_id}"])
        if rows:
            _table(["", "CHECKPOINT", "NAME", "RUN/STEP/TASK", "SIZE", "WHY"], rows)
