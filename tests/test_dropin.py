"""Flows and notebooks written for metaflow-checkpoint run unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FLOWS, RunFlow
from storekit import manifests, results

pytestmark = pytest.mark.flow

PUBLISHED_KEYS = {"size", "pathspec", "pathspec_hash", "attempt", "key", "type", "url", "name",
                  "created_on", "metadata", "storage_format", "creation_context", "version_id"}


def test_checkpoint_class_from_a_callback_and_a_worker_process(run_flow: RunFlow,
                                                              datastore_root: Path) -> None:
    out = run_flow("dropin_flow.py")
    r = results(out.stdout + out.stderr)
    assert set(json.loads(r["keys"])) >= PUBLISHED_KEYS
    assert int(r["size_at_save"]) > 0
    assert r["created_naive"] == "True"
    assert r["reloaded"] == "2"
    assert r["missing"] == "True"
    # The worker process saved for the task; its save was drained when it exited.
    assert r["listed"] == "mfchckpt,worker"
    assert "WORKER saved" in out.stdout
    worker = [m for _, m in manifests(datastore_root) if m.name == "worker"]
    assert [m.metadata for m in worker] == [{"by": "worker"}]
    # The retry resumed from the callback's last save.
    assert r["info_epoch"] == "2" and r["is_loaded"] == "True"
    assert len(r["task_identifier"]) == 12


NOTEBOOK = """
import json, os, sys
from metaflow import Checkpoint, Flow, namespace
namespace(None)
run = Flow("DropinFlow").latest_run
task = run["start"].task
end_task = run["end"].task
out = {}
with Checkpoint() as cp:
    # Its first attempt saved, its retry did not: the latest attempt is listed by default.
    out["latest_attempt"] = cp.list(task=task)
    refs = cp.list(task=task, attempt=0)
    out["all_attempts"] = len(cp.list(task=task, attempt="all")) == len(refs)
    out["names"] = sorted({r["name"] for r in refs})
    out["by_pathspec"] = len(cp.list(task=task.pathspec, attempt=0)) == len(refs)
    out["none"] = cp.list(task=end_task)
    path = cp.load(refs[-1])
    out["loaded_files"] = sorted(os.listdir(path))
    latest = cp.load(task.pathspec, os.path.join(cp.directory, "latest"))
    out["latest_files"] = sorted(os.listdir(latest))
    try:
        cp.load({"key": 42})
    except ValueError as e:
        out["bad"] = type(e).__name__
    try:
        Checkpoint().save("/tmp")
    except Exception as e:
        out["save_outside"] = type(e).__name__
print("NOTEBOOK " + json.dumps(out))
"""


def test_notebook_lists_and_loads_by_task_pathspec_and_reference(
        run_flow: RunFlow, flow_env: dict[str, str], tmp_path: Path) -> None:
    run_flow("dropin_flow.py")
    proc = subprocess.run([sys.executable, "-c", NOTEBOOK], cwd=tmp_path, env=flow_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("NOTEBOOK "))
    out = json.loads(line[len("NOTEBOOK "):])
    assert out["names"] == ["mfchckpt", "worker"]
    assert out["latest_attempt"] == [] and out["all_attempts"] is True
    assert out["by_pathspec"] is True
    assert out["none"] == []
    assert out["loaded_files"] and out["latest_files"]
    assert out["bad"] == "CheckpointReferenceError"
    assert out["save_outside"] == "CheckpointException"
    assert os.path.exists(FLOWS / "dropin_flow.py")


def test_list_after_save_and_of_a_retried_task(run_flow: RunFlow) -> None:
    out = run_flow("listing_flow.py")
    r = results(out.stdout + out.stderr)
    # Each branch, in each attempt, lists the save it just made first, however far its
    # upload got; the count grows by one per save (the retry adds to its first attempt's).
    for branch in ("a", "b"):
        assert json.loads(r[f"seen_{branch}_0"]) == [[True, n] for n in range(1, 7)]
        assert json.loads(r[f"seen_{branch}_1"]) == [[True, n] for n in range(7, 13)]
    # list(task=...) is of the latest attempt unless told otherwise, as published.
    assert json.loads(r["latest"]) == [1] * 6
    assert json.loads(r["first"]) == [0] * 6
    assert r["every"] == "12"
