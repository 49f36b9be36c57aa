"""Flows on Metaflow's gs datastore, run as users run them, against the GCS emulator:
the seed example, a retried foreach that resumes from its checkpoints, and retention.
(The command line on GCS: the "gs" store of tests/test_cli.py.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import RunFlow
from storekit import results
from test_retention_flows import check_output, check_store

from uploader import Engine, Settings

pytestmark = [pytest.mark.flow, pytest.mark.gcs]


def committed(store: Any) -> list[tuple[str, dict[str, Any]]]:
    """(object name, manifest) of every committed checkpoint in the test's bucket."""
    return [(b.name, json.loads(b.download_as_bytes())) for b in store.client().list_blobs()
            if "/manifests/" in b.name and b.name.endswith(".json")]


def test_seed_example_runs_on_the_gs_datastore(gcs_env: dict[str, str], gcs_store: Any,
                                               tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, random\nrandom.seed(int(os.environ['TEST_RANDOM_SEED']))\n")
    example = Path(__file__).parent.parent / "examples" / "checkpoint_counter.py"
    env = {**gcs_env, "PYTHONPATH": str(site), "TEST_RANDOM_SEED": "3"}
    out = subprocess.run([sys.executable, str(example), "run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Final counter 10" in text and "Bad luck" in text and "Loaded checkpoint" in text
    found = committed(gcs_store)
    prefix = "metaflow/mf.checkpoints/CheckpointCounterFlow/"
    assert found and all(name.startswith(prefix) for name, _ in found)
    # Every stored file holds the bytes its manifest names (Google's client reads them).
    bucket = gcs_store.client()
    for name, m in found:
        head = name.rpartition("/manifests/")[0]
        for f in m["files"]:
            key = f.get("key") or f"{head}/data/{m['run_id']}/{m['checkpoint_id']}/{f['path']}"
            key = key if key.startswith("metaflow/") else f"metaflow/{key}"
            data = bucket.blob(key).download_as_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"], key


def test_retried_foreach_branches_resume_from_their_own_checkpoints_on_gs(
        run_flow: RunFlow, gcs_env: dict[str, str], gcs_store: Any) -> None:
    out = run_flow("foreach_flow.py", env=gcs_env)
    r = results(out.stdout + out.stderr)
    assert {k: v for k, v in r.items() if k.startswith("branch")} == {
        "branch0": "0", "branch1": "1", "branch2": "2"}
    assert len(committed(gcs_store)) == 3


def test_retention_in_a_task_on_gs(run_flow: RunFlow, gcs_env: dict[str, str], gcs_store: Any,
                                   tmp_path: Path) -> None:
    out = run_flow("retention_flow.py", env=gcs_env)
    check_output(out.stdout + out.stderr)
    engine = Engine(lambda ctx: gcs_store.backend(ctx), Settings(),
                    snapshot_dir=str(tmp_path / "snap"))
    try:
        check_store(engine, tmp_path)
    finally:
        engine.close()


def test_a_missing_bucket_fails_the_task_and_says_what_to_check(
        run_flow: RunFlow, gcs_env: dict[str, str]) -> None:
    env = {**gcs_env, "METAFLOW_DATASTORE_SYSROOT_GS": "gs://no-such-bucket-x/metaflow"}
    out = run_flow("foreach_flow.py", env=env, check=False)
    assert out.returncode != 0
    assert "no-such-bucket-x" in out.stdout + out.stderr


def test_gs_factory_reads_metaflow_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import metaflow  # noqa: F401  the extension's modules import through it

    from metaflow_extensions.asynccheckpoint.plugins.shared.exceptions import (
        CheckpointConfigException,
    )
    from metaflow_extensions.asynccheckpoint.plugins.shared.gs_storage import (
        emulator_endpoint,
        split_gs_url,
    )

    assert split_gs_url("gs://bucket/a/b/") == ("bucket", "a/b")
    assert split_gs_url("gs://bucket") == ("bucket", "")
    with pytest.raises(CheckpointConfigException, match="METAFLOW_DATASTORE_SYSROOT_GS"):
        split_gs_url("s3://bucket/x")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:9023")
    assert emulator_endpoint() == "http://127.0.0.1:9023"
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    assert emulator_endpoint() is None
