"""Flows as users run them on every kind of Metaflow datastore (see storekits.py): the seed
example, and a retried foreach whose branches resume from their own checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import RunFlow, stores
from storekit import results

from uploader import Engine, Settings
from uploader.config import UploaderMode

pytestmark = pytest.mark.flow


def stored(store: Any, tmp_path: Path, prefix: str) -> tuple[list[str], list[Any]]:
    """The manifest keys under ``prefix``, and the uploads left half-done anywhere."""
    engine = Engine(store.backend, Settings(uploader=UploaderMode.THREAD),
                    snapshot_dir=str(tmp_path / "snap"), log=lambda _: None)
    try:
        keys = engine.run(engine.backend.list_keys, prefix)
        return ([k for k in keys if "/manifests/" in k],
                engine.run(engine.backend.list_uploads, ""))
    finally:
        engine.close()


def test_seed_example_runs_on_each_datastore(store: Any, flow_env: dict[str, str],
                                             tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, random\nrandom.seed(int(os.environ['TEST_RANDOM_SEED']))\n")
    example = Path(__file__).parent.parent / "examples" / "checkpoint_counter.py"
    env = {**flow_env, **store.flow_env(tmp_path), "PYTHONPATH": str(site),
           "TEST_RANDOM_SEED": "3"}
    out = subprocess.run([sys.executable, str(example), "run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Final counter 10" in text and "Loaded checkpoint" in text
    manifests, uploads = stored(store, tmp_path, "mf.checkpoints/CheckpointCounterFlow/")
    assert manifests and uploads == []


@stores("local")  # scope by foreach index is the store's business nowhere: one store by default
def test_retried_foreach_branches_resume_from_their_own_checkpoints(
        run_flow: RunFlow, store: Any, tmp_path: Path) -> None:
    """Branches with equal foreach values keep their own checkpoints: scope is by index."""
    out = run_flow("foreach_flow.py", env=store.flow_env(tmp_path))
    r = results(out.stdout + out.stderr)
    assert {k: v for k, v in r.items() if k.startswith("branch")} == {
        "branch0": "0", "branch1": "1", "branch2": "2"}
    manifests, uploads = stored(store, tmp_path, "mf.checkpoints/ForeachFlow/")
    assert len(manifests) == 3 and uploads == []
