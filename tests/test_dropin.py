"""Flows and notebooks written for metaflow-checkpoint run unchanged."""

from __future__ import annotations

import json
import os
import re
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


def _run_ids(text: str) -> list[str]:
    return re.findall(r"run-id (\d+)", text)


def test_resume_finds_the_checkpoints_of_cloned_and_resumed_tasks(run_flow: RunFlow) -> None:
    # evaluate failed; resume clones train: listing the clone lists what train saved.
    first = run_flow("origin_flow.py", env={"ORIGIN_FAIL": "evaluate"}, check=False)
    assert first.returncode != 0
    again = run_flow("origin_flow.py", env={"ORIGIN_FAIL": "evaluate"}, command="resume")
    assert results(again.stdout + again.stderr)["listed"] == "1"
    # train failed after saving: resume runs it again, and it starts from that save.
    failed = run_flow("origin_flow.py", env={"ORIGIN_FAIL": "train"}, check=False)
    origin = _run_ids(failed.stdout + failed.stderr)[0]
    resumed = run_flow("origin_flow.py", env={"ORIGIN_FAIL": "train"}, command="resume")
    new = _run_ids(resumed.stdout + resumed.stderr)[0]
    assert results(resumed.stdout + resumed.stderr)[f"loaded_{new}"] == f"saved by {origin}"


def test_a_checkpoint_tag_scopes_eager_to_its_experiment(run_flow: RunFlow) -> None:
    a1 = run_flow("origin_flow.py", "--tag", "checkpoint:expA")
    run_a1 = _run_ids(a1.stdout + a1.stderr)[0]
    assert "scoped by its tag 'checkpoint:expA'" in a1.stdout + a1.stderr
    b1 = run_flow("origin_flow.py", "--tag", "checkpoint:expB")
    run_b1 = _run_ids(b1.stdout + b1.stderr)[0]
    # expB never sees expA's checkpoint, and expA's next run resumes from its own.
    assert results(b1.stdout + b1.stderr)[f"loaded_{run_b1}"] == "None"
    a2 = run_flow("origin_flow.py", "--tag", "checkpoint:expA")
    run_a2 = _run_ids(a2.stdout + a2.stderr)[0]
    assert results(a2.stdout + a2.stderr)[f"loaded_{run_a2}"] == f"saved by {run_a1}"
    # An untagged run is in the namespace's scope, apart from both.
    plain = run_flow("origin_flow.py")
    run_p = _run_ids(plain.stdout + plain.stderr)[0]
    assert results(plain.stdout + plain.stderr)[f"loaded_{run_p}"] == "None"
