"""What ``python flow.py checkpoint ...`` does: the five commands, and how they print.

Each takes a :class:`.checkpoint_finder.Session` (the flow's store and namespace) and does
its reading through the catalog, loading through the engine's verified load. A failure
that is the store's answer (nothing there, a corrupt file) exits 1 with a message;
usage errors are click's (exit 2).
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
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from metaflow._vendor import click

from uploader import CheckpointError, CheckpointKeys, ManifestError
from uploader.catalog import Entry
from uploader.manifest import refused_path
from uploader.retention import (
    PrunePlan,
    RetentionPolicy,
    execute_prune,
    parse_grace,
    plan_prune,
)

from ..shared.exceptions import CheckpointConfigException, CheckpointException
from .checkpoint_finder import CheckpointNotFoundException, Session, Target

__all__ = ["download", "list_checkpoints", "prune", "show", "verify"]

# Files `verify` reads back at once. Each lands in a scratch file that is removed once
# checked, so this bounds the disk it needs as well as the files in flight (a large
# file's own ranges are fetched concurrently by the engine).
VERIFY_WORKERS = 4
# How often a progress bar is redrawn.
PROGRESS_INTERVAL_S = 0.2


class CheckpointDownloadException(CheckpointException):
    headline = "Checkpoint download failed"


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


def _print_rows(s: Session, rows: Sequence[dict[str, Any]]) -> None:
    refs = any(r["referenced_bytes"] for r in rows)
    gangs = any(r["gang"] for r in rows)
    headers = ["NAME", "RUN/STEP/TASK", "ATTEMPT", "CHECKPOINT ID", "SIZE"]
    headers += ["STORED"] if refs else []
    headers += ["RANKS"] if gangs else []
    headers += ["CREATED (UTC)", "STATE"]
    headers += ["NAMESPACE"] if s.namespace is None else []
    table = []
    for r in rows:
        cells = [r["name"] or "-", r["pathspec"].split("/", 1)[1], str(r["attempt"]),
                 r["checkpoint_id"], _size(r["size_bytes"])]
        cells += [_size(r["stored_bytes"])] if refs else []
        cells += [_ranks(r["gang"])] if gangs else []
        cells += [_when(r["created_on"]), r["state"]]
        cells += [r["namespace"] or "-"] if s.namespace is None else []
        table.append(cells)
    _table(headers, table)


def _ranks(gang: dict[str, Any] | None) -> str:
    """``3/3``: parts committed of a gang checkpoint's participants; ``-`` for a plain one."""
    if gang is None:
        return "-"
    ranks = gang["ranks"].values()
    return f"{sum(1 for r in ranks if r['state'] == 'committed')}/{len(ranks)}"


def list_checkpoints(s: Session, pathspec: str | None, *, name: str | None,
                     incomplete: bool, as_json: bool) -> None:
    target = Target.parse(pathspec, s.flow)
    entries = s.committed(target)
    shown = [e for e in entries if name is None or e.manifest.name == name]
    rows = [(e.keys, s.row(e)) for e in shown]
    if incomplete:
        rows += [(e.keys, s.row(e)) for e in s.incomplete_gangs(target)
                 if name is None or e.manifest.name == name]
    if incomplete and name is None:
        # What a later checkpoint still reads may lie in another run of the scope.
        scoped = entries if target.run is None else s.committed(
            Target(step=target.step))
        rows += [(u.keys, s.uncommitted_row(u))
                 for u in s.uncommitted(target, scoped)]
    if not rows:
        named = "" if name is None else f" named {name!r}"
        raise CheckpointNotFoundException(
            f"{target.label(s.flow)} has no checkpoints{named} {s.where()}."
            f"{s.hint()}")
    by_keys = dict(rows)
    ordered = [by_keys[k] for k in CheckpointKeys.newest_first(by_keys)]
    if as_json:
        click.echo(json.dumps({
            "flow": s.flow, "namespace": s.namespace, "datastore": s.datastore,
            "datastore_root": s.catalog.engine.backend.url, "checkpoints": ordered,
        }, indent=1))
        return
    _print_rows(s, ordered)
    n = sum(1 for r in ordered if r["state"] == "committed")
    total = sum(r["size_bytes"] or 0 for r in ordered)
    # Where checkpoints share unchanged files, what they hold is more than what the store
    # holds for them: each object counted once, wherever it lies (an object a checkpoint
    # reads may sit under an older checkpoint that retention has deleted).
    objects = {p.keys.stored(f.path, f.key): f.size for e in shown
               for p in ([e] if e.gang is None else e.gang.parts.values())
               for f in p.manifest.files}
    stored = sum(objects.values()) + sum(r["size_bytes"] or 0 for r in ordered
                                         if r["state"] != "committed")
    also = f" ({_size(stored)} in the store)" if stored != total else ""
    click.echo(f"{_n(n, 'committed checkpoint')}, {_size(total)}{also}, of "
               f"{target.label(s.flow)} {s.where()}.")


def show(s: Session, which: str, *, name: str | None, as_json: bool) -> None:
    entry = s.resolve(which, name=name)
    m, r = entry.manifest, s.row(entry)
    backend = s.catalog.engine.backend
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
    if r["gang"] is not None:
        g = r["gang"]
        fields.insert(1, ("gang", f"{_ranks(g)} parts committed, of a gang of {g['size']} "
                                  f"ranks (step {g['step']})"))
    for label, value in fields:
        click.echo(f"  {label:<10} {value}")
    if r["gang"] is not None:
        click.echo("  ranks")
        _table(["   ", "RANK", "STATE", "CHECKPOINT ID", "TASK"], [
            ["   ", rank, p["state"], p["checkpoint_id"] or "-", p["task_id"] or "-"]
            for rank, p in r["gang"]["ranks"].items()])
    click.echo("  files")
    rows = []
    for f in m.files:
        where = "" if f.key is None else backend.url_of(
            entry.keys.stored(f.path, f.key))
        rows.append(["   ", _size(f.size), f.sha256, f.path, where])
    _table(["   ", "SIZE", "SHA-256", "PATH", "STORED IN (IF EARLIER)" if any(
        r[4] for r in rows) else ""], rows)


def download(s: Session, which: str, directory: str, *, name: str | None,
             progress: bool) -> None:
    entry = s.resolve(which, name=name)
    m, dest = entry.manifest, os.path.abspath(directory)
    before = _staging(dest)
    failed: list[BaseException] = []
    done = threading.Event()

    def load() -> None:
        try:
            s.catalog.load(entry, dest)
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


def _to_verify(s: Session, which: str | None, name: str | None
               ) -> tuple[list[Entry], list[CheckpointKeys]]:
    """The checkpoints to verify, and the manifests under the target that cannot be read."""
    if which is not None and s.names_one(which):
        return [s.resolve(which)], []
    target = Target.parse(which, s.flow)
    entries = s.committed(target)
    read = {e.keys for e in entries}
    unread = [] if name is not None else [
        k for k in s.inventory().manifests if target.has_keys(k) and k not in read]
    return [e for e in entries if name is None or e.manifest.name == name], unread


def verify(s: Session, which: str | None, *, name: str | None, as_json: bool,
           progress: bool) -> None:
    entries, unread = _to_verify(s, which, name)
    if not entries and not unread:
        named = "" if name is None else f" named {name!r}"
        label = Target.parse(which, s.flow).label(s.flow)
        raise CheckpointNotFoundException(
            f"{label} has no committed checkpoints{named} {s.where()}.{s.hint()}")
    catalog = s.catalog  # made here, not by the threads below
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
            raise CheckpointException(f"cannot read checkpoints {s.where()}: {e}") from e
    jobs = []
    for e in entries:
        # The rule every load applies first: a manifest listing a path no reader places
        # (``../x``, twice, a file and a directory) fails whole, and its data is not read.
        refused = refused_path([f.path for f in e.manifest.files])
        if refused is None:
            jobs += [(e, f) for f in e.manifest.files]
            continue
        failures.append({
            "checkpoint_id": e.keys.checkpoint_id, "name": e.manifest.name,
            "key": e.keys.manifest, "file": refused[0], "data_key": None,
            "error": f"checkpoint {e.manifest.name!r} ({e.keys.checkpoint_id}): its manifest "
                     f"{engine.backend.url_of(e.keys.manifest)} lists {refused[1]}: no "
                     "reader loads this checkpoint, so its files were not read."})
    total = sum(f.size for _, f in jobs)
    # Sizes from the store's listing, not from what a read returns: a ranged read asks
    # for the manifest's size and would not see bytes appended to an object.
    sizes: dict[str, int] = {}
    with s.reading():
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
               f"{_size(total)}) {s.where()}: ")
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


def prune(s: Session, pathspec: str | None, *, keep_last: int | None,
          keep_best: int | None, best_metric: str | None, best_mode: str,
          protect: Sequence[str], grace: float | None, dry_run: bool, as_json: bool) -> None:
    if keep_last is None and keep_best is None:
        raise click.UsageError("prune needs a rule: --keep-last N, --keep-best N "
                               "--best-metric KEY, or both.")
    try:
        policy = RetentionPolicy(keep_last=keep_last, keep_best=keep_best,
                                 best_metric=best_metric, best_mode=best_mode)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    target = Target.parse(pathspec, s.flow)
    if target.task is not None:
        raise click.BadParameter(
            "prune keeps and deletes per scope (a step, or one foreach branch of it): "
            "give RUN or RUN/STEP, not a task.", param_hint="PATHSPEC")
    protected = _protected(s, protect)
    inv = s.inventory()
    scopes = [scope for scope in inv.scopes if target.has_scope(scope)]
    if target.run is not None:  # the scopes where the run saved something
        keys = [*inv.manifests, *(u.keys for u in inv.uncommitted)]
        scopes = [scope for scope in scopes if any(
            k.scope_prefix == scope and target.has_keys(k) for k in keys)]
    if not scopes:
        raise CheckpointNotFoundException(
            f"{target.label(s.flow)} has no checkpoints {s.where()}.{s.hint()}")
    if grace is None:  # as tasks prune: METAFLOW_CHECKPOINT_DEBRIS_GRACE
        from metaflow import metaflow_config

        try:
            grace = parse_grace(getattr(metaflow_config, "CHECKPOINT_DEBRIS_GRACE", None),
                                "METAFLOW_CHECKPOINT_DEBRIS_GRACE")
        except ValueError as e:
            raise CheckpointConfigException(str(e)) from e
    plans = []
    with s.reading():
        for scope in scopes:
            plans.append((scope, plan_prune(s.catalog, scope, policy, run_id=target.run,
                                            protect=protected, grace_s=grace)))
    runs = _runs(plans)
    reports = []
    if not dry_run:
        with s.reading():
            reports = [execute_prune(s.catalog, plan) for _, plan in plans]
    errors = [err for r in reports for err in r.errors]
    if as_json:
        click.echo(json.dumps({
            "dry_run": dry_run, "flow": s.flow, "namespace": s.namespace, "runs": runs,
            "freed_bytes": _freed(plans),
            "scopes": [_plan_json(s, scope, plan) for scope, plan in plans],
            "deleted": None if dry_run else {
                "checkpoints": sum(r.checkpoints_deleted for r in reports),
                "objects": sum(r.objects_deleted for r in reports),
                "bytes": sum(r.bytes_freed for r in reports),
                "debris": sum(r.debris_removed for r in reports),
                "uploads_aborted": sum(r.uploads_aborted for r in reports),
                "errors": errors},
        }, indent=1))
    else:
        if target.run is None and runs:
            click.echo(f"Considering {_n(len(runs), 'run')} of {s.flow}, newest first: "
                       f"{', '.join(runs)}. Each run's resume point is kept: a run still "
                       "running may retry from it.")
        for scope, plan in plans:
            _print_plan(s, scope, plan, dry_run=dry_run)
        if dry_run:
            n = sum(len(p.delete) for _, p in plans)
            debris = sum(len(p.debris) for _, p in plans)
            click.echo(f"Dry run: would delete {_n(n, 'checkpoint')} and the data of "
                       f"{_n(debris, 'incomplete checkpoint')}, freeing "
                       f"{_size(_freed(plans))}; nothing was deleted.")
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


def _protected(s: Session, protect: Sequence[str]) -> list[str]:
    """The checkpoint ids ``--protect`` names, each found as any CHECKPOINT argument is;
    a usage error, before anything is deleted, for one that matches nothing."""
    ids = []
    for which in protect:
        try:
            ids.append(s.resolve(which).keys.checkpoint_id)
        except click.BadParameter as e:
            e.param_hint = "'--protect'"
            raise
        except CheckpointNotFoundException as e:
            prog = click.get_current_context().find_root().info_name
            raise click.BadParameter(
                f"{which!r} matches no committed checkpoint {s.where()}, so nothing was "
                f"pruned.{s.hint()} `python {prog} checkpoint list` lists the checkpoint "
                "ids; a manifest key, a URL or a pathspec (its newest checkpoint) are "
                "accepted too.", param_hint="'--protect'") from e
    return ids


def _runs(plans: Sequence[tuple[str, PrunePlan]]) -> list[str]:
    """The runs whose checkpoints ``plans`` consider, newest first."""
    entries = {e.keys: e for _, p in plans for e in (*p.keep, *p.delete)}
    runs: list[str] = []
    for keys in CheckpointKeys.newest_first(entries):
        run = entries[keys].manifest.run_id
        if run not in runs:
            runs.append(run)
    return runs


def _freed(plans: Sequence[tuple[str, PrunePlan]]) -> int:
    """The bytes executing ``plans`` frees (see ``PrunePlan.freed_bytes``)."""
    return sum(p.freed_bytes for _, p in plans)


def _plan_json(s: Session, scope: str, plan: PrunePlan) -> dict[str, Any]:
    def ids(entries: Iterable[Entry]) -> list[dict[str, Any]]:
        return [{"checkpoint_id": e.keys.checkpoint_id, "name": e.manifest.name,
                 "key": e.keys.manifest,
                 "reason": plan.reasons.get(e.keys.checkpoint_id)} for e in entries]

    return {"scope": scope, "runs": _runs([(scope, plan)]), "freed_bytes": plan.freed_bytes,
            "keep": ids(plan.keep), "delete": ids(plan.delete),
            "debris": list(plan.debris), "uploads": [list(u) for u in plan.uploads],
            "unreadable": list(plan.unreadable)}


def _print_plan(s: Session, scope: str, plan: PrunePlan, *, dry_run: bool) -> None:
    frees = f", freeing {_size(plan.freed_bytes)}" if dry_run else ""
    click.echo(f"{scope}: keep {len(plan.keep)}, "
               f"{'would delete' if dry_run else 'delete'} {len(plan.delete)}{frees}")
    rows = []
    for verb, entries in (("keep", plan.keep), ("delete", plan.delete)):
        for e in entries:
            r = s.row(e)
            rows.append(["  " + verb, r["checkpoint_id"], r["name"],
                         r["pathspec"].split("/", 1)[1], _size(r["size_bytes"]),
                         plan.reasons.get(e.keys.checkpoint_id, "")])
    for prefix in plan.debris:
        rows.append(["  debris", prefix, "-", "-", "?", "data without a manifest"])
    for key, upload_id in plan.uploads:
        rows.append(["  abort", key, "-", "-", "?", f"multipart upload {upload_id}"])
    for key in plan.unreadable:
        rows.append(["  blocks", key, "-", "-", "?",
                     "a manifest this version cannot read: nothing in the scope is deleted"])
    if rows:
        _table(["", "CHECKPOINT", "NAME", "RUN/STEP/TASK", "SIZE", "WHY"], rows)
