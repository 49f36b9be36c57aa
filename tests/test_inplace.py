"""Checkpoints keep committing while training rewrites its files in place."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import RunFlow
from storekit import manifests, results, stored_bytes

pytestmark = pytest.mark.flow


def _check_consistent(datastore_root: Path, size: int) -> list[int]:
    values = []
    for keys, m in manifests(datastore_root):
        value = m.metadata["value"]
        data = stored_bytes(datastore_root, keys, "weights.bin",
                            {f.path: f.key for f in m.files}["weights.bin"])
        assert len(data) == size and data == bytes([value]) * size, (keys.manifest, value)
        values.append(value)
    return sorted(values)


def test_in_place_rewrites_cost_at_most_the_first_checkpoint(run_flow: RunFlow,
                                                              datastore_root: Path) -> None:
    out = run_flow("inplace_flow.py", env={"METAFLOW_CHECKPOINT_COPY_BUDGET": "0"})
    text = out.stdout + out.stderr
    values = _check_consistent(datastore_root, 64 << 20)
    # Every save but at most the first commits, each with exactly its own bytes.
    assert set(range(2, 13)) <= set(values), (values, text)
    # Said once, with the cost and the fix.
    assert text.count("rewritten in place while an upload") == 1, text
    assert "os.replace()" in text and "MiB in" in text
    assert len(results(text)["blocked_ms"].split(",")) == 12


def test_killed_task_resumes_from_one_of_its_last_saves(run_flow: RunFlow,
                                                       datastore_root: Path) -> None:
    out = run_flow("killed_flow.py", env={"METAFLOW_CHECKPOINT_COPY_BUDGET": "0",
                                          "METAFLOW_CHECKPOINT_MAX_PENDING": "2"})
    r = results(out.stdout + out.stderr)
    # save() returns only while at most MAX_PENDING (2) uploads are pending, so when the
    # 8th returns, the 6th is done; only a file's first checkpoint may be torn.
    assert int(r["resumed"]) in (6, 7, 8), out.stderr
    assert r["resumed_bytes"] == r["resumed"]
    _check_consistent(datastore_root, 64 << 20)


def test_torn_best_is_not_superseded_by_another_name(run_flow: RunFlow,
                                                    datastore_root: Path) -> None:
    out = run_flow("supersede_flow.py", check=False,
                   env={"METAFLOW_CHECKPOINT_COPY_BUDGET": "0"})
    text = out.stdout + out.stderr
    assert results(text)["best"] == "TornCheckpointError", text
    # The step returned, but its "best" checkpoint does not exist: the task fails, naming
    # it and the artifact that holds its dangling reference.
    assert out.returncode != 0, text
    assert "No later save named 'best' was committed" in text
    assert "self.best" in text
    names = [m.name for _, m in manifests(datastore_root)]
    assert names == ["last"], names
