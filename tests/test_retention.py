"""Retention: plan and execute prunes on the local store and on S3 (moto over HTTP).

Checkpoints are made by a real engine; the store is then read back through a fresh
:class:`Catalog`, the way any reader finds checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, running_s3_server

from uploader import (
    CheckpointKeys,
    Engine,
    FileEntry,
    LocalBackend,
    RetentionPolicy,
    SaveRequest,
    Scope,
    Settings,
    TransferContext,
    execute_prune,
    new_checkpoint_id,
    plan_prune,
)
from uploader.catalog import Catalog
from uploader.config import UploaderMode
from uploader.pruner import Pruner
from uploader.retention import DEFAULT_GRACE_S, parse_count, parse_grace

BUCKET = "ckpt-retention"
SCOPE = Scope("Flow", "user:tester", "train", ())
PREFIX = SCOPE.prefix
HOURS = 3600.0


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with running_s3_server() as srv:
        yield srv


@pytest.fixture(params=["local", "s3"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclasses.dataclass
class Store:
    kind: str
    make: Callable[[], Engine]  # a new engine on the same store
    s3: S3Server | None
    engines: list[Engine]
    endpoint: str = ""  # S3: where new engines send requests (a FaultProxy, say)

    def engine(self) -> Engine:
        e = self.make()
        self.engines.append(e)
        return e


@pytest.fixture
def store(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    settings = Settings(uploader=UploaderMode.THREAD, upload_concurrency=4)
    s3: S3Server | None = None
    if kind == "local":
        def factory(ctx: TransferContext) -> Any:
            return LocalBackend(str(tmp_path / "store"), ctx)
    else:
        s3 = request.getfixturevalue("server").fresh(BUCKET, monkeypatch, tmp_path)

        def factory(ctx: TransferContext) -> Any:
            from uploader.backends.s3 import S3Backend

            return S3Backend(ctx, bucket=BUCKET, prefix="metaflow", endpoint_url=st.endpoint)

    n = iter(range(1000))

    def make() -> Engine:
        return Engine(factory, settings, snapshot_dir=str(tmp_path / f"snap{next(n)}"),
                      log=lambda m: None)

    st = Store(kind, make, s3, [], s3.endpoint if s3 is not None else "")
    yield st
    for e in st.engines:
        e.close()


def save(engine: Engine, tmp: Path, epoch: int, *, loss: Any = None, run_id: str = "1",
         latest: bool = True) -> CheckpointKeys:
    """A committed checkpoint with two files; its bytes follow from ``epoch``."""
    src = tmp / f"src{epoch}-{run_id}"
    (src / "sub").mkdir(parents=True)
    (src / "epoch.txt").write_text(str(epoch))
    (src / "sub" / "w.bin").write_bytes(bytes([epoch % 256]) * (1000 + epoch))
    keys = CheckpointKeys(PREFIX, run_id, new_checkpoint_id("7", 0))
    meta: dict[str, Any] = {"epoch": epoch}
    if loss is not None:
        meta["val_loss"] = loss
    engine.save(SaveRequest(source=str(src), keys=keys, name="ck", latest=latest,
                            metadata=meta, identity={"task_id": "7", "attempt": 0},
                            reference={})).wait()
    return keys


def epochs(catalog: Catalog, **kw: Any) -> list[int]:
    return [int(e.manifest.metadata["epoch"]) for e in catalog.entries(PREFIX, **kw)]


def all_load(catalog: Catalog, tmp: Path) -> None:
    """Every listed checkpoint loads, verified, with the bytes its epoch says."""
    for e in catalog.entries(PREFIX):
        dest = tmp / f"load-{e.keys.checkpoint_id}"
        catalog.load(e, str(dest))
        ep = int(e.manifest.metadata["epoch"])
        assert (dest / "epoch.txt").read_text() == str(ep)
        assert (dest / "sub" / "w.bin").read_bytes() == bytes([ep % 256]) * (1000 + ep)


def data_keys(engine: Engine, where: str = "") -> list[str]:
    return sorted(o.key for o in engine.run(engine.backend.list_objects,
                                            f"{PREFIX}/data/{where}"))


# -- the policy, on its own ---------------------------------------------------------


def test_policy_validation_names_the_field_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"keep_last=0 .*integer >= 1"):
        RetentionPolicy(keep_last=0)
    with pytest.raises(ValueError, match=r"keep_best=2 needs best_metric"):
        RetentionPolicy(keep_best=2)
    with pytest.raises(ValueError, match=r"best_mode='median' .*'min'"):
        RetentionPolicy(best_mode="median")
    with pytest.raises(ValueError, match=r"keep_last=True"):
        RetentionPolicy(keep_last=True)
    assert not RetentionPolicy().active
    assert RetentionPolicy(keep_last=1).active
    assert parse_count(" 3 ", "X") == 3 and parse_count("", "X") is None
    with pytest.raises(ValueError, match=r"^X is not valid"):
        parse_count("three", "X")
    assert parse_grace(None, "G") == DEFAULT_GRACE_S and parse_grace("0", "G") == 0
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(ValueError, match=r"^G is not valid"):
            parse_grace(bad, "G")


# -- keeping and deleting --------------------------------------------------------------

# Best (lowest) at epochs 2 and 5, never among the last three; epoch 7 has no number.
LOSSES: dict[int, Any] = {0: 0.9, 1: 0.8, 2: 0.1, 3: 0.7, 4: 0.6, 5: 0.2, 6: 0.5,
                          7: "n/a", 8: float("nan"), 9: 0.95, 10: 0.99, 11: 0.97}


def test_keeps_the_last_and_the_best_and_deletes_the_rest(store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    for ep, loss in LOSSES.items():
        save(engine, tmp_path, ep, loss=loss)
    catalog = Catalog(store.engine())
    policy = RetentionPolicy(keep_last=3, keep_best=2, best_metric="val_loss")
    plan = plan_prune(catalog, PREFIX, policy)
    kept = [int(e.manifest.metadata["epoch"]) for e in plan.keep]
    assert kept == [11, 10, 9, 5, 2]
    assert sorted(int(e.manifest.metadata["epoch"]) for e in plan.delete) == [0, 1, 3, 4, 6, 7, 8]
    by_epoch = {int(e.manifest.metadata["epoch"]): e.keys.checkpoint_id
                for e in plan.keep + plan.delete}
    assert plan.reasons[by_epoch[11]] == "newest, last 3"
    assert plan.reasons[by_epoch[2]] == "best 2 by val_loss"
    assert plan.reasons[by_epoch[0]].startswith("deleted")
    assert plan.debris == () and plan.uploads == ()

    report = execute_prune(catalog, plan)
    assert report.errors == []
    assert report.checkpoints_deleted == 7
    assert report.objects_deleted == 7 * 3  # each: its manifest and two files
    assert report.bytes_freed == sum(len(str(e)) + 1000 + e for e in (0, 1, 3, 4, 6, 7, 8))
    fresh = Catalog(store.engine())
    assert epochs(fresh) == [11, 10, 9, 5, 2]
    all_load(fresh, tmp_path)
    # Nothing of the deleted ones is left, and nothing of the kept ones is missing.
    left = {k[len(PREFIX) + len("/data/"):].split("/")[1] for k in data_keys(engine)}
    assert left == {by_epoch[e] for e in (11, 10, 9, 5, 2)}
    # Done: a second prune finds nothing.
    again = plan_prune(fresh, PREFIX, policy)
    assert again.delete == () and again.debris == ()


def test_max_mode_and_a_run_filter(store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    for ep in range(4):
        save(engine, tmp_path, ep, loss=float(ep), run_id="other")
    for ep in range(4, 10):
        save(engine, tmp_path, ep, loss=float(10 - ep), run_id="1")
    catalog = Catalog(engine)
    plan = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1, keep_best=1,
                                                       best_metric="val_loss", best_mode="max"),
                      run_id="1")
    # Within run 1 only: newest 9, highest loss (6.0) at epoch 4; run "other" untouched.
    assert [int(e.manifest.metadata["epoch"]) for e in plan.keep] == [9, 4]
    execute_prune(catalog, plan)
    assert sorted(epochs(Catalog(store.engine()))) == [0, 1, 2, 3, 4, 9]


def test_without_a_rule_nothing_committed_is_deleted(store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    for ep in range(3):
        save(engine, tmp_path, ep)
    plan = plan_prune(Catalog(engine), PREFIX, RetentionPolicy(), grace_s=0,
                      now=time.time() + HOURS)
    assert plan.delete == () and len(plan.keep) == 3
    assert execute_prune(Catalog(engine), plan).objects_deleted == 0
    assert epochs(Catalog(engine)) == [2, 1, 0]


def test_never_deletes_the_newest_the_protected_or_the_resume_point(
        store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    keys = [save(engine, tmp_path, ep, loss=float(ep)) for ep in range(4)]
    save(engine, tmp_path, 4, loss=99.0, latest=False)  # newest, but not a resume point
    catalog = Catalog(engine)
    # The best (epoch 0) is the oldest: only rule-less protection keeps the others.
    plan = plan_prune(catalog, PREFIX, RetentionPolicy(keep_best=1, best_metric="val_loss"),
                      protect=[keys[1].checkpoint_id])
    assert sorted(int(e.manifest.metadata["epoch"]) for e in plan.keep) == [0, 1, 3, 4]
    assert plan.reasons[keys[1].checkpoint_id] == "protected"
    assert plan.reasons[keys[3].checkpoint_id].startswith("resume point")
    execute_prune(catalog, plan)
    assert epochs(Catalog(engine)) == [4, 3, 1, 0]


def test_data_a_kept_manifest_points_at_is_not_deleted(store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    old = save(engine, tmp_path, 0)
    save(engine, tmp_path, 1)
    newest = save(engine, tmp_path, 2)
    catalog = Catalog(engine)
    # An incremental save: the newest checkpoint's w.bin is the bytes epoch 0 stored.
    entry = catalog.read(newest.manifest)
    assert entry is not None
    first = catalog.read(old.manifest)
    assert first is not None
    w0 = next(f for f in first.manifest.files if f.path == "sub/w.bin")
    files = tuple(FileEntry(f.path, w0.size, w0.sha256, newest.relative(old.data(f.path)))
                  if f.path == "sub/w.bin" else f for f in entry.manifest.files)
    inc = dataclasses.replace(entry.manifest, files=files)
    engine.run(engine.backend.put_bytes, newest.manifest, inc.to_json())

    report = execute_prune(catalog, plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1)))
    assert report.errors == [] and report.checkpoints_deleted == 2
    assert data_keys(engine, f"1/{old.checkpoint_id}/") == [old.data("sub/w.bin")]
    dest = tmp_path / "inc"
    (kept,) = Catalog(store.engine()).entries(PREFIX)
    catalog.load(kept, str(dest))
    assert (dest / "sub" / "w.bin").read_bytes() == bytes([0]) * 1000
    assert (dest / "epoch.txt").read_text() == "2"
    # What is left of epoch 0 is referenced: never debris, however old.
    later = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1), grace_s=0,
                       now=time.time() + HOURS)
    assert later.debris == ()
    execute_prune(catalog, later)
    assert data_keys(engine, f"1/{old.checkpoint_id}/") == [old.data("sub/w.bin")]


def test_freed_bytes_leave_out_what_a_kept_manifest_of_any_run_reads(
        store: Store, tmp_path: Path) -> None:
    """The plan's figure is what executing it frees: run 2's checkpoint reads run 1's
    oldest object, so deleting run 1's oldest frees only its other file."""
    engine = store.engine()
    old = save(engine, tmp_path, 0)
    save(engine, tmp_path, 1)
    other = save(engine, tmp_path, 2, run_id="2")
    catalog = Catalog(engine)
    first, entry = catalog.read(old.manifest), catalog.read(other.manifest)
    assert first is not None and entry is not None
    w0 = next(f for f in first.manifest.files if f.path == "sub/w.bin")
    files = tuple(dataclasses.replace(w0, key=other.relative(old.data(w0.path)))
                  if f.path == "sub/w.bin" else f for f in entry.manifest.files)
    engine.run(engine.backend.put_bytes, other.manifest,
               dataclasses.replace(entry.manifest, files=files).to_json())

    plan = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1), run_id="1")
    assert [e.keys for e in plan.delete] == [old]
    assert plan.freed_bytes == len("0")  # not sub/w.bin, which run 2 reads
    report = execute_prune(catalog, plan)
    assert report.errors == [] and report.bytes_freed == plan.freed_bytes
    assert data_keys(engine, f"1/{old.checkpoint_id}/") == [old.data("sub/w.bin")]
    # Once run 2's manifest is gone, what is left is debris, and counted as it is freed.
    engine.run(engine.backend.delete_keys, [other.manifest])
    plan = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1), grace_s=0,
                      now=time.time() + HOURS)
    assert sorted(plan.debris) == sorted([old.data_prefix, other.data_prefix])
    assert plan.freed_bytes == sum(
        o.size for o in engine.run(engine.backend.list_objects, f"{PREFIX}/data/")
        if o.key.startswith((old.data_prefix, other.data_prefix)))
    report = execute_prune(catalog, plan)
    assert report.errors == [] and report.bytes_freed == plan.freed_bytes


def test_a_prune_of_every_run_keeps_each_runs_resume_point(store: Store,
                                                            tmp_path: Path) -> None:
    """Run 1 (older, maybe still running) would retry from its newest latest=True one."""
    engine = store.engine()
    run1 = [save(engine, tmp_path, ep, run_id="1") for ep in range(2)]
    save(engine, tmp_path, 2, run_id="1", latest=False)
    run2 = [save(engine, tmp_path, ep, run_id="2") for ep in range(3, 5)]
    catalog = Catalog(engine)
    plan = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1))
    assert {e.keys for e in plan.keep} == {run2[1], run1[1]}
    assert plan.reasons[run1[1].checkpoint_id].startswith("resume point of run 1 ")
    report = execute_prune(catalog, plan)
    assert report.errors == [] and report.checkpoints_deleted == 3
    assert catalog.latest(PREFIX, run_id="1") is not None
    assert catalog.latest(PREFIX, run_id="1").keys == run1[1]  # type: ignore[union-attr]


def test_keys_a_pending_save_references_are_not_deleted(store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    old = save(engine, tmp_path, 0)
    save(engine, tmp_path, 1)
    held = old.data("sub/w.bin")
    # What Engine.referenced_keys() reports: an incremental save not yet committed.
    engine.referenced_keys = lambda: {held}  # type: ignore[attr-defined]
    catalog = Catalog(engine)
    report = execute_prune(catalog, plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1)))
    assert report.errors == [] and report.checkpoints_deleted == 1
    assert data_keys(engine, f"1/{old.checkpoint_id}/") == [held]
    del engine.referenced_keys  # type: ignore[attr-defined]
    # Once nothing references it, it is debris.
    later = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1), grace_s=0,
                       now=time.time() + HOURS)
    assert later.debris == (old.data_prefix,)
    assert execute_prune(catalog, later).debris_removed == 1
    assert data_keys(engine, f"1/{old.checkpoint_id}/") == []


# -- crashes and debris -----------------------------------------------------------------


def test_a_crash_between_manifest_and_data_leaves_only_whole_checkpoints(
        store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    for ep in range(5):
        save(engine, tmp_path, ep)
    backend = engine.backend
    real_delete = backend.delete_keys
    calls: list[list[str]] = []

    async def crash_after_manifests(keys: Any) -> list[tuple[str, str]]:
        if not any("/locks/" in k for k in keys):  # the prune's own marker comes and goes
            calls.append(list(keys))
        if any("/data/" in k for k in keys):
            raise ConnectionResetError("the process died here")
        return await real_delete(keys)

    backend.delete_keys = crash_after_manifests  # type: ignore[method-assign]
    catalog = Catalog(engine)
    report = execute_prune(catalog, plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=2)))
    assert report.checkpoints_deleted == 3 and report.bytes_freed == 0
    assert any("the process died here" in e for e in report.errors), report.errors
    assert len(calls) == 2 and all("/manifests/" in k for k in calls[0])
    # Readers see the two kept checkpoints, whole; the rest is invisible.
    reader = Catalog(store.engine())
    assert epochs(reader) == [4, 3]
    all_load(reader, tmp_path)
    assert len(data_keys(engine)) == 5 * 2

    backend.delete_keys = real_delete  # type: ignore[method-assign]
    young = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=2))
    assert young.debris == ()  # within the grace period: maybe an upload in flight
    old = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=2), grace_s=0,
                     now=time.time() + 1)
    assert len(old.debris) == 3 and old.delete == ()
    report = execute_prune(catalog, old)
    assert report.errors == [] and report.debris_removed == 3 and report.objects_deleted == 6
    assert len(data_keys(engine)) == 2 * 2
    all_load(Catalog(store.engine()), tmp_path)


@pytest.mark.parametrize("kind", ["s3"])
def test_s3_delete_errors_are_retried_or_reported_by_key(store: Store, tmp_path: Path) -> None:
    from faultproxy import FaultProxy, error

    engine = store.engine()
    for ep in range(3):
        save(engine, tmp_path, ep)
    assert store.s3 is not None
    with FaultProxy(store.s3.endpoint) as proxy:
        # The manifests' DeleteObjects is throttled once (and retried); the data's is denied.
        proxy.add_rule(error(503, "SlowDown", "Reduce your request rate."), method="POST",
                       query_contains="delete", times=1)
        proxy.add_rule(error(403, "AccessDenied", "Access Denied"), method="POST",
                       query_contains="delete", every=2)
        plan = plan_prune(Catalog(engine), PREFIX, RetentionPolicy(keep_last=1))
        store.endpoint = proxy.endpoint
        pruning = store.engine()
        report = execute_prune(Catalog(pruning), plan)
        # The manifests' twice, the data's, and the prune's marker as it ends.
        assert proxy.count(method="POST", query_contains="delete") == 4
    store.endpoint = store.s3.endpoint
    assert report.checkpoints_deleted == 2 and report.bytes_freed == 0
    (err,) = report.errors
    assert "AccessDenied" in err and "s3:DeleteObject" in err and f"'{BUCKET}'" in err
    assert "/data/1/" in err  # names the key
    reader = Catalog(store.engine())
    assert epochs(reader) == [2]
    all_load(reader, tmp_path)


def test_debris_older_than_the_grace_is_removed_and_younger_is_not(
        store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    save(engine, tmp_path, 0)
    # A checkpoint whose process died before its manifest: two objects, no manifest.
    dead = CheckpointKeys(PREFIX, "2", new_checkpoint_id("9", 1))
    for rel in ("a.bin", "deep/b.bin"):
        engine.run(engine.backend.put_bytes, dead.data(rel), b"x" * 10)
    catalog = Catalog(engine)
    policy = RetentionPolicy()
    assert plan_prune(catalog, PREFIX, policy).debris == ()
    assert plan_prune(catalog, PREFIX, policy, now=time.time() + DEFAULT_GRACE_S - HOURS
                      ).debris == ()
    assert plan_prune(catalog, PREFIX, policy, protect=[dead.checkpoint_id],
                      now=time.time() + DEFAULT_GRACE_S + 60).debris == ()
    plan = plan_prune(catalog, PREFIX, policy, now=time.time() + DEFAULT_GRACE_S + 60)
    assert plan.debris == (dead.data_prefix,)
    report = execute_prune(catalog, plan)
    assert (report.debris_removed, report.objects_deleted, report.bytes_freed) == (1, 2, 20)
    assert data_keys(engine, "2/") == []
    assert epochs(Catalog(engine)) == [0]
    all_load(Catalog(engine), tmp_path)
    if store.kind == "local":  # the directories it left are gone too, the store's are not
        root = Path(engine.backend.url)
        assert not (root / PREFIX / "data" / "2").exists()
        assert (root / PREFIX / "data" / "1").is_dir()


def test_a_killed_local_writer_s_temporary_file_is_debris(tmp_path: Path) -> None:
    engine = Engine(lambda ctx: LocalBackend(str(tmp_path / "store"), ctx), Settings(),
                    snapshot_dir=str(tmp_path / "snap"))
    try:
        dead = CheckpointKeys(PREFIX, "1", new_checkpoint_id("9", 0))
        tmp = tmp_path / "store" / dead.data_prefix / ".ckpt-tmp-0123456789abcdef0123456789abcdef"
        tmp.parent.mkdir(parents=True)
        tmp.write_bytes(b"half a file")
        catalog = Catalog(engine)
        plan = plan_prune(catalog, PREFIX, RetentionPolicy(), grace_s=0, now=time.time() + 1)
        assert plan.debris == (dead.data_prefix,)
        execute_prune(catalog, plan)
        assert not tmp.exists() and not tmp.parent.exists()
    finally:
        engine.close()


def test_a_temporary_file_of_a_killed_manifest_write_goes_after_the_grace(tmp_path: Path
                                                                          ) -> None:
    engine = Engine(lambda ctx: LocalBackend(str(tmp_path / "store"), ctx), Settings(),
                    snapshot_dir=str(tmp_path / "snap"))
    try:
        catalog = Catalog(engine)
        committed = save(engine, tmp_path, 1)
        runs = tmp_path / "store" / PREFIX / "manifests" / "1"
        tmp = runs / ".ckpt-tmp-0123456789abcdef0123456789abcdef"
        tmp.write_bytes(b'{"half a manifest')
        young = plan_prune(catalog, PREFIX, RetentionPolicy(), grace_s=3600)
        assert young.stale_temp == ()
        plan = plan_prune(catalog, PREFIX, RetentionPolicy(), grace_s=3600,
                          now=time.time() + 3601)
        assert plan.stale_temp == (f"{PREFIX}/manifests/1/{tmp.name}",)
        report = execute_prune(catalog, plan)
        assert report.errors == [] and report.debris_removed == 1
        assert not tmp.exists() and (tmp_path / "store" / committed.manifest).exists()
        assert epochs(catalog) == [1]
    finally:
        engine.close()


def test_incomplete_multipart_uploads_older_than_the_grace_are_aborted(
        server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server.reset()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    for name, value in (("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
                        ("AWS_DEFAULT_REGION", REGION)):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    from uploader.backends.s3 import S3Backend

    engine = Engine(lambda ctx: S3Backend(ctx, bucket=BUCKET, prefix="metaflow",
                                          endpoint_url=server.endpoint),
                    Settings(uploader=UploaderMode.THREAD), snapshot_dir=str(tmp_path / "s"))
    try:
        dead = CheckpointKeys(PREFIX, "1", new_checkpoint_id("9", 0))
        ours = client.create_multipart_upload(Bucket=BUCKET, Key=f"metaflow/{dead.data('big')}")
        other_scope = Scope("Other", "user:tester", "train", ()).prefix
        theirs = client.create_multipart_upload(Bucket=BUCKET,
                                                Key=f"metaflow/{other_scope}/data/1/x/big")
        # Ages are measured from the Initiated time the store reports (moto reports a fixed
        # one, in 2010): a clock just after it makes the upload young, one hours later old.
        (up,) = [u for u in client.list_multipart_uploads(Bucket=BUCKET)["Uploads"]
                 if u["UploadId"] == ours["UploadId"]]
        initiated = up["Initiated"].timestamp()
        catalog = Catalog(engine)
        policy = RetentionPolicy()
        assert plan_prune(catalog, PREFIX, policy, now=initiated + 60).uploads == ()
        assert plan_prune(catalog, PREFIX, policy, now=initiated + DEFAULT_GRACE_S - 60
                          ).uploads == ()
        plan = plan_prune(catalog, PREFIX, policy, now=initiated + DEFAULT_GRACE_S + 60)
        assert plan.uploads == ((dead.data("big"), ours["UploadId"]),)
        report = execute_prune(catalog, plan)
        assert report.uploads_aborted == 1 and report.errors == []
        left = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
        assert [u["UploadId"] for u in left] == [theirs["UploadId"]]
    finally:
        engine.close()


def test_a_manifest_this_version_cannot_read_stops_every_deletion(
        store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    for ep in range(3):
        save(engine, tmp_path, ep)
    future = CheckpointKeys(PREFIX, "1", new_checkpoint_id("7", 0))
    engine.run(engine.backend.put_bytes, future.manifest,
               b'{"format": 9, "min_reader": 9, "checkpoint_id": "x"}')
    catalog = Catalog(engine)
    plan = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1), grace_s=0,
                      now=time.time() + HOURS)
    assert plan.delete == () and plan.debris == () and plan.unreadable == (future.manifest,)
    report = execute_prune(catalog, plan)
    assert report.objects_deleted == 0 and "cannot be read" in report.errors[0]
    assert epochs(catalog) == [2, 1, 0]


# -- in a task: the background pruner ------------------------------------------------------


def test_the_pruner_runs_after_commits_and_drains(store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    logs: list[str] = []
    loaded = save(engine, tmp_path, 0, loss=5.0)  # as if loaded at task start
    pruner = Pruner(engine, PREFIX, RetentionPolicy(keep_last=2), run_id="1",
                    protect=lambda: [loaded.checkpoint_id], log=logs.append)
    for ep in range(1, 8):
        save(engine, tmp_path, ep)
    assert pruner.drain(60)
    assert epochs(Catalog(store.engine())) == [7, 6, 0]
    assert pruner.last is not None and pruner.last.errors == []
    assert any(m.startswith("Retention: deleted") for m in logs), logs
    pruner.close()
    save(engine, tmp_path, 8)  # closed: no prune any more
    assert pruner.drain(1)
    assert epochs(Catalog(store.engine())) == [8, 7, 6, 0]


def test_a_manifest_cache_reads_each_manifest_once(store: Store, tmp_path: Path) -> None:
    engine = store.engine()
    first = save(engine, tmp_path, 0)
    catalog = Catalog(engine)
    cache: dict[str, Any] = {}
    plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1), manifest_cache=cache)
    assert list(cache) == [first.manifest]
    # Overwritten behind the cache's back (manifests never are): the cache is what is used.
    engine.run(engine.backend.put_bytes, first.manifest, b"not json")
    second = save(engine, tmp_path, 1)
    plan = plan_prune(catalog, PREFIX, RetentionPolicy(keep_last=1), manifest_cache=cache)
    assert plan.unreadable == () and [e.keys for e in plan.delete] == [first]
    assert sorted(cache) == sorted([first.manifest, second.manifest])
    assert plan_prune(catalog, PREFIX, RetentionPolicy()).unreadable == (first.manifest,)
    report = execute_prune(catalog, plan, manifest_cache=cache)
    assert report.errors == [] and report.checkpoints_deleted == 1
    assert list(cache) == [second.manifest]  # only what is listed now


def _prune_child(cfg: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(Path(__file__).parent / "prunekit.py"),
                           json.dumps(cfg)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_prune_killed_anywhere_leaves_whole_checkpoints_and_the_next_one_cleans_up(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """SIGKILL a prune process at each operation (the local store: a sample of them):
    readers then see only whole checkpoints, and the next prune leaves exactly the kept
    ones, with no data of any other."""
    from treekit import fresh_bucket, local_engine, s3_engine

    server = request.getfixturevalue("server") if kind == "s3" else None

    def setup(trial: Path) -> tuple[Engine, dict[str, Any]]:
        trial.mkdir()
        cfg: dict[str, Any] = {"kind": kind, "tmp": str(trial), "scope": PREFIX,
                               "keep_last": 2}
        if server is None:
            engine = local_engine(trial)
        else:
            cfg["bucket"], cfg["endpoint"] = fresh_bucket(server), server.endpoint
            engine = s3_engine(server, trial, cfg["bucket"], uploader=UploaderMode.THREAD)
        for ep in range(5):
            save(engine, trial, ep)
        return engine, cfg

    engine, cfg = setup(tmp_path / "count")
    out = _prune_child(cfg)
    assert out.returncode == 0 and "DONE" in out.stdout, out.stderr
    engine.close()
    ops = int(out.stdout.split("OPS ")[1].split()[0])
    points = list(range(1, ops + 1))
    if kind == "local":  # op 2: the manifests are gone, no data is
        points = sorted({2, ops - 1, *random.Random(5).sample(points, 6)})
    for at in points:
        engine, cfg = setup(tmp_path / f"kill{at}")
        try:
            out = _prune_child({**cfg, "kill_op": at})
            assert out.returncode == -signal.SIGKILL, (at, out.stdout, out.stderr)
            reader = Catalog(engine)
            seen = epochs(reader)
            assert seen[:2] == [4, 3] and set(seen) <= {0, 1, 2, 3, 4}, (at, seen)
            all_load(reader, tmp_path / f"loads{at}")
            report = execute_prune(reader, plan_prune(
                reader, PREFIX, RetentionPolicy(keep_last=2), grace_s=0, now=time.time() + 1))
            assert report.errors == [], (at, report.errors)
            kept = reader.entries(PREFIX)
            assert [int(e.manifest.metadata["epoch"]) for e in kept] == [4, 3]
            ids = {k[len(PREFIX) + len("/data/"):].split("/")[1] for k in data_keys(engine)}
            assert ids == {e.keys.checkpoint_id for e in kept}, at
            all_load(reader, tmp_path / f"after{at}")
        finally:
            engine.close()


def test_a_failing_prune_logs_a_warning_and_fails_nothing(tmp_path: Path) -> None:
    logs: list[str] = []
    engine = Engine(lambda ctx: LocalBackend(str(tmp_path / "store"), ctx), Settings(),
                    snapshot_dir=str(tmp_path / "snap"), log=logs.append)
    try:
        async def broken(prefix: str) -> Any:
            raise PermissionError(13, "Permission denied", prefix)

        engine.backend.list_objects = broken  # type: ignore[method-assign]
        pruner = Pruner(engine, PREFIX, RetentionPolicy(keep_last=1), run_id="1",
                        log=logs.append)
        for ep in range(3):
            save(engine, tmp_path, ep)  # each commits: wait() raises otherwise
        assert pruner.drain(60)
        assert epochs(Catalog(engine)) == [2, 1, 0]
        warnings = [m for m in logs if "pruning old checkpoints" in m]
        assert len(warnings) == 1 and "Permission denied" in warnings[0], logs
        assert "Checkpoints are unaffected" in warnings[0]
        pruner.close()
    finally:
        engine.close()
