"""Flows on Metaflow's S3 datastore against a real S3 server (moto) on loopback."""

from __future__ import annotations

import hashlib
import json
import random
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme
from conftest import S3_BUCKET, RunFlow
from faultproxy import RESET, FaultProxy, cut, error, stall
from storekit import results

pytestmark = [pytest.mark.flow, pytest.mark.s3]

CKPT = r"/mf\.checkpoints/"
SMALL_PARTS = {"METAFLOW_CHECKPOINT_PART_SIZE": "5MiB",
               "METAFLOW_CHECKPOINT_MULTIPART_THRESHOLD": "5MiB"}


def committed(client: Any) -> list[tuple[str, dict[str, Any]]]:
    """(manifest key, manifest) of every committed checkpoint in the bucket."""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET):
        for obj in page.get("Contents", ()):
            if "/manifests/" in obj["Key"] and obj["Key"].endswith(".json"):
                body = client.get_object(Bucket=S3_BUCKET, Key=obj["Key"])["Body"].read()
                out.append((obj["Key"], json.loads(body)))
    return out


def data_bytes(client: Any, manifest_key: str, m: dict[str, Any], path: str) -> bytes:
    head, _, _ = manifest_key.rpartition("/manifests/")
    key = f"{head}/data/{m['run_id']}/{m['checkpoint_id']}/{path}"
    return bytes(client.get_object(Bucket=S3_BUCKET, Key=key)["Body"].read())


def check_s3_flow_checkpoints(client: Any) -> None:
    from flows.s3_flow import content

    found = committed(client)
    assert sorted(m["metadata"]["seed"] for _, m in found) == [0, 1, 2]
    for key, m in found:
        seed = m["metadata"]["seed"]
        by_path = {f["path"]: f for f in m["files"]}
        weights = data_bytes(client, key, m, "weights.bin")
        assert weights == content(seed)
        assert hashlib.sha256(weights).hexdigest() == by_path["weights.bin"]["sha256"]
        assert data_bytes(client, key, m, "step.txt") == str(seed).encode()
    assert client.list_multipart_uploads(Bucket=S3_BUCKET).get("Uploads", []) == []


def test_multipart_checkpoints_round_trip_on_s3(run_flow: RunFlow, s3_env: dict[str, str],
                                                s3_server: Any) -> None:
    run_flow("s3_flow.py", env={**s3_env, **SMALL_PARTS})
    check_s3_flow_checkpoints(s3_server.client())


def test_every_checkpoint_commits_with_20_percent_of_requests_failing(
        run_flow: RunFlow, s3_env: dict[str, str], s3_server: Any) -> None:
    with FaultProxy(s3_server.endpoint) as proxy:
        # Only checkpoint traffic is disturbed; Metaflow's own artifacts go through untouched.
        proxy.add_rule(RESET, path_regex=CKPT, probability=0.1, seed=1)
        proxy.add_rule(error(503, "SlowDown", "Please reduce your request rate."),
                       path_regex=CKPT, probability=0.1 / 0.9, seed=2)
        env = {**s3_env, **SMALL_PARTS, "METAFLOW_S3_ENDPOINT_URL": proxy.endpoint,
               "METAFLOW_CHECKPOINT_MAX_ATTEMPTS": "20"}
        out = run_flow("s3_flow.py", env=env)
        faults = proxy.count(path_regex=CKPT, action="reset") + proxy.count(
            path_regex=CKPT, action="error")
        total = proxy.count(path_regex=CKPT)
    assert faults >= 3, f"only {faults} of {total} requests were disturbed\n{out.stderr}"
    check_s3_flow_checkpoints(s3_server.client())


def test_access_denied_fails_fast_and_fails_the_task(run_flow: RunFlow,
                                                     s3_env: dict[str, str],
                                                     s3_server: Any) -> None:
    data = CKPT + r".*/data/"  # the save's lease (under locks/) is written; its data is not
    with FaultProxy(s3_server.endpoint) as proxy:
        proxy.add_rule(error(403, "AccessDenied", "Access Denied"), method="PUT",
                       path_regex=data)
        env = {**s3_env, "METAFLOW_S3_ENDPOINT_URL": proxy.endpoint}
        out = run_flow("denied_flow.py", env=env, check=False)
        puts = proxy.count(method="PUT", path_regex=data)
    text = out.stdout + out.stderr
    r = results(text)
    assert float(r["seconds"]) < 2.0
    assert "AccessDenied" in r["error"] and "s3:PutObject" in r["error"]
    assert "checkpoint 'mfchckpt'" in r["error"]
    assert f"bucket '{S3_BUCKET}'" in r["error"] and "w.bin" in r["error"]
    # The task fails at teardown with the same message, and nothing was retried.
    assert out.returncode != 0
    assert "@checkpoint upload failed" in text
    assert puts == 1
    assert committed(s3_server.client()) == []


def test_checksum_mismatch_on_s3_load_is_caught(s3_env: dict[str, str], s3_server: Any,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:


    from uploader import (
        CheckpointKeys,
        ChecksumMismatchError,
        Engine,
        SaveRequest,
        Scope,
        Settings,
        TransferContext,
        new_checkpoint_id,
    )
    from uploader.backends.s3 import S3Backend

    for k, v in s3_env.items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(random.Random(0).randbytes(7 << 20))

    def factory(ctx: TransferContext) -> S3Backend:
        return S3Backend(ctx, bucket=S3_BUCKET, prefix="ck", endpoint_url=s3_server.endpoint)

    engine = Engine(factory, Settings(part_size=5 << 20, multipart_threshold=5 << 20),
                    snapshot_dir=str(tmp_path / "snaps"))
    try:
        scope = Scope("F", "user:t", "s")
        keys = CheckpointKeys(scope.prefix, "1", new_checkpoint_id("1", 0))
        engine.save(SaveRequest(source=str(src), keys=keys, name="n", latest=True,
                                metadata={}, identity={}, reference={})).wait(60)
        manifest = engine.read_manifest(keys)
        assert manifest is not None
        engine.load(manifest, str(tmp_path / "good"))
        assert (tmp_path / "good" / "w.bin").read_bytes() == (src / "w.bin").read_bytes()
        client = s3_server.client()
        client.put_object(Bucket=S3_BUCKET, Key=f"ck/{keys.data('w.bin')}",
                          Body=b"\0" * (7 << 20))
        with pytest.raises(ChecksumMismatchError, match=r"w\.bin"):
            engine.load(manifest, str(tmp_path / "bad"))
        assert not (tmp_path / "bad" / "w.bin").exists()
    finally:
        engine.close()



def test_checkpoints_commit_over_tls_through_stalled_and_cut_replies(
        run_flow: RunFlow, s3_env: dict[str, str], s3_server: Any, tmp_path: Path) -> None:
    """The store behind TLS with a private CA named by AWS_CA_BUNDLE, and a short read
    timeout set where users set client options: checkpoint replies that stall or end early
    are retried, and every checkpoint commits whole."""
    ca = trustme.CA()
    ca_file = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    weights = CKPT + r".*/data/.*weights\.bin$"
    with FaultProxy(s3_server.endpoint, tls=tls) as proxy:
        proxy.add_rule(stall("status"), method="PUT", path_regex=weights,
                       query_contains="partNumber=1", times=1)
        proxy.add_rule(stall("headers"), method="PUT", path_regex=weights,
                       query_contains="partNumber=2", times=1)
        proxy.add_rule(cut("status"), method="PUT", path_regex=weights,
                       query_contains="partNumber=3", times=1)
        proxy.add_rule(cut("headers"), method="PUT", path_regex=CKPT + r".*/step\.txt$",
                       times=1)
        env = {**s3_env, **SMALL_PARTS, "METAFLOW_S3_ENDPOINT_URL": proxy.endpoint,
               "AWS_CA_BUNDLE": str(ca_file),
               "METAFLOW_DATATOOLS_CLIENT_PARAMS": json.dumps({"config": {"read_timeout": 1}})}
        out = run_flow("s3_flow.py", env=env)
        faults = (proxy.count(action="stall"), proxy.count(action="cut"))
    assert faults == (2, 2), out.stderr
    check_s3_flow_checkpoints(s3_server.client())
