"""``python flow.py checkpoint ...`` run as users run it, on checkpoints real flow runs made.

One run of ``flows/cli_flow.py`` per backend (local datastore, S3 on a moto server, Azure
on Azurite, GCS on an emulator) per module; each test gets a private copy of what it
stored, so tests that corrupt or prune do not affect the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FLOWS, stores

from uploader import CheckpointKeys, Manifest

pytestmark = [pytest.mark.flow]

FLOW = FLOWS / "cli_flow.py"
# Two runs whose checkpoints share an unchanged file (see flows/cli_share_flow.py).
SHARE_FLOW = FLOWS / "cli_share_flow.py"
BASE_ENV = {
    "METAFLOW_DEFAULT_DATASTORE": "local",
    "METAFLOW_DEFAULT_METADATA": "local",
    "USERNAME": "tester",
    "PYTHONUNBUFFERED": "1",
}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METAFLOW_", "AWS_"))}
    env.update(BASE_ENV)
    return env


def _run_flow(cwd: Path, env: dict[str, str], flow: Path = FLOW) -> str:
    out = subprocess.run([sys.executable, str(flow), "--no-pylint", "run"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"run-id (\S+?)\)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    return m.group(1)


@dataclasses.dataclass
class Store:
    """A private copy of one flow run's checkpoints, and the CLI pointed at it."""

    kind: str
    env: dict[str, str]
    run_id: str
    cwd: Path
    root: Path | None = None  # local: the datastore root
    client: Any = None  # s3: a boto3 client, the bucket, and the datastore prefix
    bucket: str = ""
    flow: Path = FLOW
    runs: tuple[str, ...] = ()  # every run stored, oldest first
    gcs_bucket: Any = None  # gs: google-cloud-storage's Bucket
    container: Any = None  # azure: the container's (synchronous) client

    def cli(self, *args: str, rc: int | None = 0, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([sys.executable, str(self.flow), "checkpoint", *args], cwd=self.cwd,
                             env={**self.env, **(env or {})}, capture_output=True, text=True,
                             timeout=120)
        if rc is not None:
            assert out.returncode == rc, (
                f"exit {out.returncode}, not {rc}\n--- stdout\n{out.stdout}\n--- stderr\n"
                f"{out.stderr}")
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def stored_keys(self) -> list[str]:
        if self.root is not None:
            return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*")
                          if p.is_file() and "mf.checkpoints" in p.parts)
        if self.gcs_bucket is not None:
            return sorted(b.name[len("metaflow/"):] for b in self.gcs_bucket.list_blobs(
                prefix="metaflow/mf.checkpoints/"))
        if self.container is not None:
            return sorted(b.name[len("metaflow/"):] for b in self.container.list_blobs(
                name_starts_with="metaflow/mf.checkpoints/"))
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix="metaflow/mf.checkpoints/"):
            out += [o["Key"][len("metaflow/"):] for o in page.get("Contents", ())]
        return sorted(out)

    def delete(self, key: str) -> None:
        if self.root is not None:
            (self.root / key).unlink()
        elif self.gcs_bucket is not None:
            self.gcs_bucket.blob(f"metaflow/{key}").delete()
        elif self.container is not None:
            self.container.delete_blob(f"metaflow/{key}")
        else:
            self.client.delete_object(Bucket=self.bucket, Key=f"metaflow/{key}")

    def put(self, key: str, data: bytes) -> None:
        """Overwrite (or create) a stored object, behind the engine's back."""
        if self.root is not None:
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        elif self.gcs_bucket is not None:
            self.gcs_bucket.blob(f"metaflow/{key}").upload_from_string(data)
        elif self.container is not None:
            self.container.upload_blob(f"metaflow/{key}", data, overwrite=True)
        else:
            self.client.put_object(Bucket=self.bucket, Key=f"metaflow/{key}", Body=data)


@pytest.fixture(scope="module")
def local_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("cli-local")
    env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(base / "ds")}
    return base / "ds", _run_flow(base, env)


@pytest.fixture(scope="module")
def s3_source(s3_server: Any, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[str, str]]:
    base = tmp_path_factory.mktemp("cli-s3")
    s3_server.reset()
    s3_server.client().create_bucket(Bucket="cli-source")
    env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(base / "ds"),
           **s3_server.env("cli-source"), **s3_server.credentials(base)}
    yield "cli-source", _run_flow(base, env)


@pytest.fixture(scope="module")
def share_local_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    base = tmp_path_factory.mktemp("cli-share-local")
    env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(base / "ds")}
    return base / "ds", [_run_flow(base, env, SHARE_FLOW) for _ in range(2)]


@pytest.fixture(scope="module")
def share_s3_source(s3_source: tuple[str, str], s3_server: Any,
                    tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    # After s3_source, which resets the server: this bucket is made once that is done.
    base = tmp_path_factory.mktemp("cli-share-s3")
    s3_server.client().create_bucket(Bucket="cli-share-source")
    env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(base / "ds"),
           **s3_server.env("cli-share-source"), **s3_server.credentials(base)}
    return "cli-share-source", [_run_flow(base, env, SHARE_FLOW) for _ in range(2)]


@pytest.fixture(scope="module")
def gcs_source(gcs_kit: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, str]:
    base = tmp_path_factory.mktemp("cli-gcs")
    source = gcs_kit.fresh("cli-source")
    env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(base / "ds"),
           **source.flow_env(base)}
    return source, _run_flow(base, env)


@pytest.fixture(scope="module")
def azure_source(store_kits: Any, tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Any, str]:
    base = tmp_path_factory.mktemp("cli-azure")
    source = store_kits.get("azure").fresh("cli-source")
    env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(base / "ds"),
           **source.flow_env(base)}
    return source, _run_flow(base, env)


_copies = iter(range(1_000_000))


def _copy(request: pytest.FixtureRequest, tmp_path: Path, source: str, flow: Path) -> Store:
    """A private copy of what the flow runs of fixture ``source`` (+ the backend) stored."""
    if request.param == "local":
        ds, runs = request.getfixturevalue(f"{source}local_source")
        runs = [runs] if isinstance(runs, str) else runs
        shutil.copytree(ds, tmp_path / "ds")
        env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds")}
        return Store("local", env, runs[-1], tmp_path, root=tmp_path / "ds" / ".metaflow",
                     flow=flow, runs=tuple(runs))
    if request.param == "azure":
        asource, run_id = request.getfixturevalue(f"{source}azure_source")
        acopy = request.getfixturevalue("store_kits").get("azure").fresh("cli-copy")
        container = acopy.client()
        for blob in asource.client().list_blobs():
            data = asource.client().download_blob(blob.name).readall()
            container.upload_blob(blob.name, data)
        env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds"),
               **acopy.flow_env(tmp_path)}
        return Store("azure", env, run_id, tmp_path, container=container, flow=flow,
                     runs=(run_id,))
    if request.param == "gs":
        gsource, run_id = request.getfixturevalue(f"{source}gcs_source")
        copy = request.getfixturevalue("gcs_kit").fresh(f"cli-copy-{next(_copies)}")
        src, dst = gsource.client(), copy.client()
        for blob in src.list_blobs():
            src.copy_blob(blob, dst, blob.name)
        env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds"),
               **copy.flow_env(tmp_path)}
        return Store("gs", env, run_id, tmp_path, gcs_bucket=dst, flow=flow, runs=(run_id,))
    bucket_from, runs = request.getfixturevalue(f"{source}s3_source")
    runs = [runs] if isinstance(runs, str) else runs
    server = request.getfixturevalue("s3_server")
    client = server.client()
    bucket = f"cli-copy-{next(_copies)}"
    client.create_bucket(Bucket=bucket)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket_from):
        for o in page.get("Contents", ()):
            client.copy_object(Bucket=bucket, Key=o["Key"],
                               CopySource={"Bucket": bucket_from, "Key": o["Key"]})
    env = {**_clean_env(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds"),
           **server.env(bucket), **server.credentials(tmp_path)}
    return Store("s3", env, runs[-1], tmp_path, client=client, bucket=bucket, flow=flow,
                 runs=tuple(runs))


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A private copy of CliFlow's run on the store a test's :func:`stores` mark names."""
    return _copy(request, tmp_path, "", FLOW)


# By default: reading (list, show, download) on every store; the corrupt-object verify and
# the dry-run-then-real prune, which read every object or delete, on the local store and S3;
# the rest, which the command line decides over what any store lists, on the local store.
# Each test's other stores are in the slow tier.
CLI_STORES = ("local", "s3", "azure", "gs")
EVERY_STORE = stores(*CLI_STORES, names=CLI_STORES)
LOCAL_AND_S3 = stores("local", "s3", names=CLI_STORES)
LOCAL = stores("local", names=CLI_STORES)


@pytest.fixture(params=[
    "local", pytest.param("s3", marks=[pytest.mark.s3, pytest.mark.slow])])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Two runs of CliShareFlow: the second resumed from the first, and points at its
    object."""
    return _copy(request, tmp_path, "share_", SHARE_FLOW)


def _content(epoch: int) -> bytes:
    sys.path.insert(0, str(FLOWS))
    try:
        from cli_flow import content
    finally:
        sys.path.remove(str(FLOWS))
    return bytes(content(epoch))


def _by_epoch(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["metadata"]["epoch"]: r for r in rows if r["state"] == "committed"}


# -- list ----------------------------------------------------------------------------------


@EVERY_STORE
def test_list_is_newest_first_with_sizes_and_state(store: Store) -> None:
    doc = store.json("list")
    rows = doc["checkpoints"]
    # evaluate ran after train, and train saved epochs 0, 1, 2 in that order.
    assert [(r["name"], r["metadata"]["epoch"]) for r in rows] == [
        ("report", 10), ("model", 2), ("model", 1), ("model", 0)]
    assert doc["namespace"] == "user:tester" and doc["datastore"] == store.kind
    stored = set(store.stored_keys())
    for r in rows:
        epoch = r["metadata"]["epoch"]
        size = len(_content(epoch)) + len(str(epoch))
        assert (r["state"], r["files"], r["size_bytes"]) == ("committed", 2, size)
        assert (r["stored_bytes"], r["referenced_bytes"]) == (size, 0)
        assert r["run_id"] == store.run_id and r["key"] in stored
        assert r["pathspec"] == f"CliFlow/{store.run_id}/{r['step']}/{r['task_id']}"
        assert r["created_on"] <= r["committed_on"]
    assert [r["step"] for r in rows] == ["evaluate", "train", "train", "train"]

    # The human table, in the same order, one line per checkpoint.
    text = store.cli("list").stdout
    lines = [ln for ln in text.splitlines() if ln.split() and ln.split()[-1] == "committed"]
    assert [next(c for c in ln.split() if c in {r["checkpoint_id"] for r in rows})
            for ln in lines] == [r["checkpoint_id"] for r in rows]
    assert "SIZE" in text.splitlines()[0] and "4 committed checkpoints" in text


@LOCAL
def test_list_narrows_to_a_run_step_task_and_name(store: Store) -> None:
    everything = store.json("list")["checkpoints"]
    train = store.json("list", f"{store.run_id}/train")["checkpoints"]
    assert [r["metadata"]["epoch"] for r in train] == [2, 1, 0]
    task = train[0]["task_id"]
    assert store.json("list", f"CliFlow/{store.run_id}/train/{task}")["checkpoints"] == train
    assert store.json("list", store.run_id)["checkpoints"] == everything
    named = store.json("list", "--name", "report")["checkpoints"]
    assert [r["step"] for r in named] == ["evaluate"]
    # Every namespace includes ours; another namespace has none of them.
    assert store.json("list", "--all-namespaces")["checkpoints"] == everything
    out = store.cli("list", "--namespace", "user:somebody-else", rc=1)
    assert "no checkpoints" in out.stderr and "--all-namespaces" in out.stderr


@LOCAL
def test_list_incomplete_shows_data_without_a_manifest(store: Store) -> None:
    committed = store.json("list")["checkpoints"]
    newest = committed[1]  # a train checkpoint
    head = newest["key"].rpartition("/manifests/")[0]
    # What a crash between the data and the manifest leaves: the data, no manifest.
    orphan_id = newest["checkpoint_id"].replace("-a0-", "-a1-")
    store.put(f"{head}/data/{store.run_id}/{orphan_id}/weights.bin", b"partial")
    assert store.json("list")["checkpoints"] == committed
    rows = store.json("list", "--incomplete")["checkpoints"]
    assert [r["checkpoint_id"] for r in rows if r["state"] == "incomplete"] == [orphan_id]
    orphan = next(r for r in rows if r["state"] == "incomplete")
    assert (orphan["attempt"], orphan["files"], orphan["size_bytes"]) == (1, 1, len(b"partial"))
    assert orphan["name"] is None and orphan["committed_on"] is None
    assert orphan["pathspec"] == newest["pathspec"]
    # A later attempt than every committed one of its task: first of them (the evaluate
    # step's checkpoint, saved later still, lists before the task's).
    assert rows[1] == orphan
    out = store.cli("show", orphan_id, rc=1)
    assert "no manifest" in out.stderr and orphan_id in out.stderr


# -- show ----------------------------------------------------------------------------------


@EVERY_STORE
def test_show_by_id_key_and_pathspec(store: Store) -> None:
    rows = _by_epoch(store.json("list")["checkpoints"])
    one = rows[1]
    shown = store.json("show", one["checkpoint_id"])
    assert shown["key"] == one["key"]
    m = shown["manifest"]
    assert (m["checkpoint_id"], m["name"], m["metadata"]) == (
        one["checkpoint_id"], "model", {"epoch": 1, "loss": 0.4})
    by_path = {f["path"]: f for f in m["files"]}
    assert by_path["weights.bin"]["sha256"] == hashlib.sha256(_content(1)).hexdigest()
    assert by_path["sub/epoch.txt"]["size"] == 1
    assert store.json("show", one["key"]) == shown
    # A pathspec: its newest checkpoint, of --name if given.
    assert store.json("show", f"{store.run_id}/train")["manifest"]["metadata"]["epoch"] == 2
    assert store.json("show", store.run_id, "--name", "model")["key"] == rows[2]["key"]
    text = store.cli("show", one["checkpoint_id"]).stdout
    assert one["checkpoint_id"] in text and '"loss": 0.4' in text
    assert by_path["weights.bin"]["sha256"] in text and "sub/epoch.txt" in text


# -- download ------------------------------------------------------------------------------


@EVERY_STORE
def test_download_copies_verified_files(store: Store, tmp_path: Path) -> None:
    rows = _by_epoch(store.json("list")["checkpoints"])
    dest = tmp_path / "out"
    out = store.cli("download", rows[0]["checkpoint_id"], str(dest))
    assert "every SHA-256 verified" in out.stdout
    assert (dest / "weights.bin").read_bytes() == _content(0)
    assert (dest / "sub" / "epoch.txt").read_text() == "0"
    assert sorted(p.name for p in dest.rglob("*")) == ["epoch.txt", "sub", "weights.bin"]
    # By pathspec: the newest; over what is already there.
    store.cli("download", f"{store.run_id}/train", str(dest))
    assert (dest / "weights.bin").read_bytes() == _content(2)


# -- verify --------------------------------------------------------------------------------


@LOCAL_AND_S3
def test_verify_finds_a_corrupt_object_and_names_it(store: Store, tmp_path: Path) -> None:
    out = store.cli("verify")
    assert "Verified 4 checkpoints (8 files" in out.stdout and "all intact" in out.stdout
    rows = _by_epoch(store.json("list")["checkpoints"])
    bad = rows[1]
    data_key = bad["key"].replace("/manifests/", "/data/")[: -len(".json")] + "/weights.bin"
    assert data_key in store.stored_keys()
    corrupt = bytearray(_content(1))
    corrupt[100] ^= 0xFF  # same size, one byte flipped
    store.put(data_key, bytes(corrupt))

    out = store.cli("verify", rc=1)
    failed = [ln for ln in out.stdout.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1, out.stdout
    assert bad["checkpoint_id"] in failed[0] and "'weights.bin'" in failed[0]
    assert data_key in failed[0]
    assert "1 failure in 1 checkpoint" in out.stdout

    doc = json.loads(store.cli("verify", "--json", rc=1).stdout)
    assert doc["ok"] is False and doc["checkpoints"] == 4
    assert [(f["checkpoint_id"], f["file"], f["data_key"]) for f in doc["failures"]] == [
        (bad["checkpoint_id"], "weights.bin", data_key)]
    assert {v["checkpoint_id"]: v["ok"] for v in doc["verified"]} == {
        r["checkpoint_id"]: r is not bad for r in rows.values()} | {
        r["checkpoint_id"]: True for r in store.json("list", "--name", "report")["checkpoints"]}
    # One checkpoint at a time: the intact one passes, the corrupt one fails.
    store.cli("verify", rows[2]["checkpoint_id"])
    store.cli("verify", bad["key"], rc=1)

    # A shorter or longer object is a size failure, a missing one says so; a download of
    # any of them places nothing.
    for data, said in ((_content(1)[:1000], "has 1000 bytes"),
                       (_content(1) + b"x", f"has {len(_content(1)) + 1} bytes")):
        store.put(data_key, data)
        out = store.cli("verify", bad["checkpoint_id"], rc=1)
        (failed,) = [ln for ln in out.stdout.splitlines() if ln.startswith("FAILED")]
        assert "'weights.bin' at " in failed and failed.endswith(f"{said}, but its manifest "
                                                                 f"says {len(_content(1))}.")
        assert bad["checkpoint_id"] in out.stdout and data_key in out.stdout
    store.delete(data_key)
    out = store.cli("verify", bad["checkpoint_id"], rc=1)
    assert "is missing from the store" in out.stdout and data_key in out.stdout
    dest = tmp_path / "out"
    out = store.cli("download", bad["checkpoint_id"], str(dest), rc=1)
    assert "weights.bin" in out.stderr
    assert not (dest / "weights.bin").exists()


@LOCAL
def test_verify_reports_an_unsafe_manifest_and_goes_on(store: Store, tmp_path: Path) -> None:
    """A hand-edited manifest listing a path outside the checkpoint fails as one checkpoint,
    by the rule every load applies; the others are verified, and the exit is 1."""
    rows = _by_epoch(store.json("list")["checkpoints"])
    base = rows[1]
    m = Manifest.from_json(json.dumps(store.json("show", base["checkpoint_id"])["manifest"])
                           .encode())
    keys = CheckpointKeys.from_manifest_key(base["key"])
    bad_id = base["checkpoint_id"].replace("-a0-", "-a3-")
    bad = CheckpointKeys(keys.scope_prefix, keys.run_id, bad_id)
    files = tuple(dataclasses.replace(f, path="../../escape.txt") if f.path == "sub/epoch.txt"
                  else f for f in m.files)
    store.put(bad.data("weights.bin"), _content(1))
    store.put(bad.manifest, dataclasses.replace(m, checkpoint_id=bad_id, files=files).to_json())

    out = store.cli("verify", rc=1)
    assert "Internal error" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    (failed,) = [ln for ln in out.stdout.splitlines() if ln.startswith("FAILED")]
    assert bad_id in failed and "unsafe path '../../escape.txt'" in failed, failed
    assert "Verified 5 checkpoints" in out.stdout and "1 failure in 1 checkpoint" in out.stdout
    doc = json.loads(store.cli("verify", "--json", rc=1).stdout)
    assert [(f["checkpoint_id"], f["file"], f["key"]) for f in doc["failures"]] == [
        (bad_id, "../../escape.txt", bad.manifest)]
    assert {v["checkpoint_id"]: v["ok"] for v in doc["verified"]} == {
        **{r["checkpoint_id"]: True for r in store.json("list", "--name", "report")[
            "checkpoints"]},
        **{r["checkpoint_id"]: True for r in rows.values()}, bad_id: False}
    # Alone, and by pathspec; as `download` refuses it, by the same rule.
    for target in (bad_id, bad.manifest, f"{store.run_id}/train"):
        out = store.cli("verify", target, rc=1)
        assert "unsafe path '../../escape.txt'" in out.stdout, out.stdout + out.stderr
    out = store.cli("download", bad_id, str(tmp_path / "out"), rc=1)
    assert "unsafe path '../../escape.txt'" in out.stderr
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()


# -- exit codes ------------------------------------------------------------------------------


@LOCAL
def test_exit_codes(store: Store) -> None:
    for args in (["list", "123456789"], ["list", f"{store.run_id}/no_such_step"],
                 ["show", "0000000000000001-9-a0-1.0-abcdef01"], ["verify", "123456789"],
                 ["download", "123456789", str(store.cwd / "x")]):
        out = store.cli(*args, rc=1)
        assert "No such checkpoint" in out.stderr or "has no" in out.stderr, out.stderr
    for args in (["list", "a/b/c/d/e"], ["list", "OtherFlow/1"], ["list", "--no-such-option"],
                 ["download"],
                 ["list", "--namespace", "x", "--all-namespaces"], ["show"]):
        out = store.cli(*args, rc=2)
        assert "Usage:" in out.stderr or "Error" in out.stderr, out.stderr
    out = store.cli("--help")
    assert "Exit codes" in out.stdout


@LOCAL
def test_a_pathspec_of_another_flow_is_a_usage_error(store: Store) -> None:
    """A flow's name is a Python class name, compared case-sensitively; a run id is never
    read from one where the rest cannot be a run's (``myflow/123``: 123 is no step)."""
    run = store.run_id
    for args, other in ((["list", "myflow/123"], "myflow"),
                        (["prune", "myflow/123", "--keep-last", "1"], "myflow"),
                        (["verify", f"myflow/{run}/train/2"], "myflow"),
                        (["list", "myflow/sfn-0f3e/train"], "myflow"),
                        (["list", "OtherFlow"], "OtherFlow"),
                        (["list", f"cliflow/{run}"], "cliflow")):
        out = store.cli(*args, rc=2)
        assert f"names the flow {other}, but this is CliFlow's" in out.stderr, out.stderr
    assert "case-sensitive" in out.stderr
    # This flow's name, and run ids however a scheduler spells them, are read as before.
    rows = store.json("list", f"{run}/train")["checkpoints"]
    assert store.json("list", f"CliFlow/{run}/train")["checkpoints"] == rows and rows
    for pathspec in ("sfn-0f3e/train", "argo-nightly-x7/train", "myrun/train"):
        out = store.cli("list", pathspec, rc=1)
        assert f"CliFlow/{pathspec} has no checkpoints" in out.stderr, out.stderr


# -- format 2: data an earlier checkpoint stored ------------------------------------------


@LOCAL
def test_sizes_of_a_checkpoint_that_reads_earlier_data(store: Store, tmp_path: Path) -> None:
    """A manifest whose unchanged file points at an earlier checkpoint's object (format 2)."""
    rows = _by_epoch(store.json("list")["checkpoints"])
    base = rows[2]
    m = Manifest.from_json(json.dumps(store.json("show", base["checkpoint_id"])["manifest"])
                           .encode())
    keys = CheckpointKeys.from_manifest_key(base["key"])
    new_id = base["checkpoint_id"].replace("-a0-", "-a2-")
    new = CheckpointKeys(keys.scope_prefix, keys.run_id, new_id)
    weights = next(f for f in m.files if f.path == "weights.bin")
    epoch = next(f for f in m.files if f.path == "sub/epoch.txt")
    # Only epoch.txt is stored again; weights.bin is read from the checkpoint before.
    store.put(new.data("sub/epoch.txt"), b"2")
    files = (dataclasses.replace(weights, key=keys.relative(keys.data("weights.bin"))), epoch)
    store.put(new.manifest, dataclasses.replace(m, checkpoint_id=new_id, files=files).to_json())

    newest = store.json("list", f"{store.run_id}/train")["checkpoints"][0]
    assert newest["checkpoint_id"] == new_id
    assert (newest["size_bytes"], newest["stored_bytes"], newest["referenced_bytes"]) == (
        weights.size + 1, 1, weights.size)
    listing = store.cli("list").stdout
    assert "STORED" in listing.splitlines()[0]
    # The total counts the shared object once: less is in the store than the sum of sizes.
    assert "in the store)" in listing.splitlines()[-1], listing
    store.cli("verify", new_id)
    dest = tmp_path / "out"
    store.cli("download", new_id, str(dest))
    assert (dest / "weights.bin").read_bytes() == _content(2)
    # The earlier object it reads is not "incomplete" data, even once its own manifest
    # is gone.
    store.delete(base["key"])
    rows_after = store.json("list", "--incomplete")["checkpoints"]
    assert base["checkpoint_id"] not in [r["checkpoint_id"] for r in rows_after]
    assert all(r["state"] == "committed" for r in rows_after)
    # Now no listed checkpoint holds the object the new one reads; it still counts once,
    # so what is in the store is exactly the sum of the sizes listed.
    assert "in the store)" not in store.cli("list").stdout.splitlines()[-1]
    store.cli("verify", new_id)


# -- prune ---------------------------------------------------------------------------------


@LOCAL_AND_S3
def test_prune_dry_run_deletes_nothing_then_prune_deletes_that(store: Store) -> None:
    before_keys = store.stored_keys()
    rows = _by_epoch(store.json("list")["checkpoints"])
    plan = store.json("prune", f"{store.run_id}/train", "--keep-last", "1", "--dry-run")
    assert plan["dry_run"] is True and plan["deleted"] is None
    (scope,) = plan["scopes"]
    assert [k["checkpoint_id"] for k in scope["keep"]] == [rows[2]["checkpoint_id"]]
    assert sorted(d["checkpoint_id"] for d in scope["delete"]) == sorted(
        [rows[0]["checkpoint_id"], rows[1]["checkpoint_id"]])
    assert all(d["reason"] for d in scope["delete"] + scope["keep"])
    assert store.stored_keys() == before_keys
    text = store.cli("prune", f"{store.run_id}/train", "--keep-last", "1", "--dry-run").stdout
    assert "would delete 2" in text and rows[0]["checkpoint_id"] in text

    done = store.json("prune", f"{store.run_id}/train", "--keep-last", "1")
    assert done["deleted"]["checkpoints"] == 2 and done["deleted"]["errors"] == []
    assert [s["delete"] for s in done["scopes"]] == [scope["delete"]]
    left = store.json("list")["checkpoints"]
    assert [r["checkpoint_id"] for r in left] == [
        r["checkpoint_id"] for r in store.json("list", "--name", "report")["checkpoints"]
    ] + [rows[2]["checkpoint_id"]]
    gone = {rows[0]["checkpoint_id"], rows[1]["checkpoint_id"]}
    assert not [k for k in store.stored_keys() if any(g in k for g in gone)]
    store.cli("verify")


@LOCAL
def test_prune_keep_best_and_usage_errors(store: Store) -> None:
    rows = _by_epoch(store.json("list")["checkpoints"])
    plan = store.json("prune", f"{store.run_id}/train", "--keep-best", "1", "--best-metric",
                      "loss", "--best-mode", "min", "--dry-run")
    (scope,) = plan["scopes"]
    assert rows[1]["checkpoint_id"] in [k["checkpoint_id"] for k in scope["keep"]]  # loss 0.4
    assert rows[0]["checkpoint_id"] in [d["checkpoint_id"] for d in scope["delete"]]
    # Data without a manifest goes once older than --grace; committed ones stay.
    head = rows[0]["key"].rpartition("/manifests/")[0]
    orphan = f"{head}/data/{store.run_id}/{rows[0]['checkpoint_id'].replace('-a0-', '-a1-')}/"
    store.put(orphan + "weights.bin", b"partial")
    kept = store.json("prune", f"{store.run_id}/train", "--keep-last", "1", "--grace", "3600",
                      "--dry-run")
    assert kept["scopes"][0]["debris"] == [] and orphan + "weights.bin" in store.stored_keys()
    # Without --grace, the grace tasks use (METAFLOW_CHECKPOINT_DEBRIS_GRACE) applies.
    out = store.cli("prune", f"{store.run_id}/train", "--keep-last", "3", "--dry-run", "--json",
                    env={"METAFLOW_CHECKPOINT_DEBRIS_GRACE": "0"})
    assert json.loads(out.stdout)["scopes"][0]["debris"] == [orphan]
    before = store.json("list")["checkpoints"]
    done = store.json("prune", f"{store.run_id}/train", "--keep-last", "3", "--grace", "0")
    assert done["scopes"][0]["debris"] == [orphan] and done["deleted"]["debris"] == 1
    assert orphan + "weights.bin" not in store.stored_keys()
    assert store.json("list")["checkpoints"] == before
    store.cli("prune", rc=2)  # no rule
    store.cli("prune", "--keep-best", "1", rc=2)  # no metric
    store.cli("prune", f"{store.run_id}/train/1", "--keep-last", "1", rc=2)  # a task
    store.cli("prune", "123456789", "--keep-last", "1", rc=1)


@LOCAL
def test_prune_protect_takes_every_checkpoint_form(store: Store) -> None:
    rows = _by_epoch(store.json("list")["checkpoints"])
    oldest = rows[0]
    train = f"{store.run_id}/train"
    manifest_url = oldest["url"].rstrip("/").replace("/data/", "/manifests/") + ".json"
    for form in (oldest["checkpoint_id"], oldest["key"], oldest["url"], manifest_url):
        plan = store.json("prune", train, "--keep-last", "1", "--protect", form, "--dry-run")
        (scope,) = plan["scopes"]
        kept = {k["checkpoint_id"]: k["reason"] for k in scope["keep"]}
        assert kept.get(oldest["checkpoint_id"]) == "protected", (form, kept)
    # One that matches nothing is a usage error, before anything is deleted.
    before = store.stored_keys()
    missing = oldest["checkpoint_id"].replace("-a0-", "-a7-")
    for form in (missing, oldest["key"].replace("-a0-", "-a7-"), "123456789"):
        out = store.cli("prune", "--keep-last", "1", "--protect", oldest["checkpoint_id"],
                        "--protect", form, rc=2)
        assert "--protect" in out.stderr and repr(form) in out.stderr, out.stderr
        assert "checkpoint list" in out.stderr and "nothing was pruned" in out.stderr
    assert store.stored_keys() == before
    # The real prune keeps what the manifest key names.
    done = store.json("prune", train, "--keep-last", "1", "--protect", oldest["key"])
    assert done["deleted"]["checkpoints"] == 1
    assert oldest["checkpoint_id"] in [r["checkpoint_id"] for r in store.json("list")[
        "checkpoints"]]


def test_prune_dry_run_counts_only_the_bytes_freed(shared: Store) -> None:
    """Checkpoints that point at an unchanged file an earlier one stored: deleting that
    earlier one frees only its own other bytes while a kept one (of any run) reads it."""
    first, _second = shared.runs
    text = shared.cli("prune", first, "--keep-last", "1", "--dry-run").stdout
    assert "freeing 2 B; nothing was deleted" in text, text
    for pathspec in ([first], []):  # one run, then every run of the flow
        plan = shared.json("prune", *pathspec, "--keep-last", "1", "--dry-run")
        assert plan["freed_bytes"] == sum(s["freed_bytes"] for s in plan["scopes"])
        done = shared.json("prune", *pathspec, "--keep-last", "1")
        assert done["deleted"]["errors"] == [] and done["deleted"]["checkpoints"] > 0
        assert done["deleted"]["bytes"] == plan["freed_bytes"], (pathspec, plan, done)
        # Each deleted checkpoint stored a one-byte file of its own; the shared one stays.
        assert 0 < plan["freed_bytes"] <= done["deleted"]["checkpoints"]
    shared.cli("verify")  # what the kept ones point at is there


def test_a_whole_flow_prune_keeps_every_runs_resume_point(shared: Store) -> None:
    first, second = shared.runs

    def resume_point(run: str) -> str:
        return next(r["checkpoint_id"] for r in shared.json("list", run)["checkpoints"]
                    if r["latest"])

    points = {run: resume_point(run) for run in shared.runs}
    plan = shared.json("prune", "--keep-last", "1", "--dry-run")
    assert plan["runs"] == [second, first]
    (scope,) = plan["scopes"]
    assert scope["runs"] == [second, first]
    kept = {k["checkpoint_id"]: k["reason"] for k in scope["keep"]}
    for run, cid in points.items():
        assert kept[cid].startswith(f"resume point of run {run} "), kept
    text = shared.cli("prune", "--keep-last", "1").stdout
    assert f"Considering 2 runs of CliShareFlow, newest first: {second}, {first}." in text
    # The older run can still retry from where it was.
    assert resume_point(first) == points[first]
    assert [r["checkpoint_id"] for r in shared.json("list", first)["checkpoints"]] == [
        points[first]]
    shared.cli("verify", points[first])
    # Given a run, only that run is considered.
    assert shared.json("prune", second, "--keep-last", "1", "--dry-run")["runs"] == [second]


# -- registration --------------------------------------------------------------------------


def test_the_command_is_registered_without_loading_it(tmp_path: Path) -> None:
    """Metaflow imports the command group only to find a command; the implementation only
    when one runs, and neither when the flow runs or shows itself."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "def _dump():\n"
        "    with open(os.environ['MODULES_OUT'], 'w') as f:\n"
        "        f.write('\\n'.join(m for m in sys.modules\n"
        "                           if 'asynccheckpoint' in m or m.startswith('uploader')))\n"
        "atexit.register(_dump)\n")

    def loaded(*args: str) -> set[str]:
        out_file = tmp_path / "modules.txt"
        env = {**_clean_env(), "PYTHONPATH": str(site), "MODULES_OUT": str(out_file),
               "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds")}
        out = subprocess.run([sys.executable, str(FLOW), "--no-pylint", *args], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return {m.rpartition(".")[2] for m in out_file.read_text().split()}

    implementation = {"checkpoint_finder", "checkpoint_commands", "inventory"}
    assert {"checkpoint_cli", *implementation}.isdisjoint(loaded("show"))
    found = loaded("checkpoint", "--help")
    assert "checkpoint_cli" in found and implementation.isdisjoint(found)
