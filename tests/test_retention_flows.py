"""Retention in a task, as users run it, on every kind of store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import RunFlow, stores
from storekit import results

from uploader import Engine, Scope, Settings
from uploader.catalog import Catalog, Entry
from uploader.config import UploaderMode

pytestmark = pytest.mark.flow

SCOPE = Scope("RetentionFlow", "user:tester", "start", ())
# 20 saves in the first attempt: the 3 newest and the 2 best; then the second attempt's 3
# newest, the 2 best, and the one it resumed from.
AFTER_FIRST = [19, 18, 17, 8, 4]
AFTER_SECOND = [23, 22, 21, 19, 8, 4]


def check_store(engine: Engine, tmp: Path) -> list[Entry]:
    catalog = Catalog(engine)
    entries = catalog.entries(SCOPE.prefix)
    assert [e.manifest.metadata["epoch"] for e in entries] == AFTER_SECOND
    for e in entries:  # every kept one loads, verified, with its own bytes
        dest = tmp / f"load-{e.keys.checkpoint_id}"
        catalog.load(e, str(dest))
        assert (dest / "epoch.txt").read_text() == str(e.manifest.metadata["epoch"])
    # Nothing of the deleted ones is left: only the kept checkpoints' data.
    objects = engine.run(engine.backend.list_objects, f"{SCOPE.prefix}/data/")
    assert {o.key.split("/")[-2] for o in objects} == {e.keys.checkpoint_id for e in entries}
    return entries


def check_output(text: str) -> None:
    r = results(text)
    assert r["loaded"] == "19"
    assert json.loads(r["listed"]) == AFTER_FIRST
    assert "Retention: deleted" in text


@stores("local", "s3")
def test_retention_in_a_task(run_flow: RunFlow, store: Any, tmp_path: Path) -> None:
    """On every kind of store (see storekits.py): what the task kept, and nothing else."""
    out = run_flow("retention_flow.py", env=store.flow_env(tmp_path))
    check_output(out.stdout + out.stderr)
    engine = Engine(store.backend, Settings(uploader=UploaderMode.THREAD),
                    snapshot_dir=str(tmp_path / "snap"))
    try:
        check_store(engine, tmp_path)
        # No upload left half-done (S3 multipart uploads, Azure uncommitted blocks).
        assert engine.run(engine.backend.list_uploads, "") == []
    finally:
        engine.close()


@pytest.mark.parametrize(("env", "expected"), [
    ({"METAFLOW_CHECKPOINT_BEST_MODE": "median"},
     "METAFLOW_CHECKPOINT_BEST_MODE='median' is not valid: expected one of 'min', 'max'"),
    ({"METAFLOW_CHECKPOINT_DEBRIS_GRACE": "-5"},
     "METAFLOW_CHECKPOINT_DEBRIS_GRACE='-5' is not valid: expected seconds >= 0"),
])
def test_bad_retention_settings_fail_the_step_at_start(run_flow: RunFlow, env: dict[str, str],
                                                       expected: str) -> None:
    out = run_flow("retention_flow.py", env=env, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert expected in text, text
    assert "@checkpoint configuration error" in text
    assert "failing on purpose" not in text  # it never ran the step's code


def test_retention_arguments_are_validated_and_win_over_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from metaflow import metaflow_config

    from metaflow_extensions.asynccheckpoint.plugins.shared.exceptions import (
        CheckpointConfigException,
    )
    from metaflow_extensions.asynccheckpoint.plugins.shared.storage import retention_settings

    where = "@checkpoint on step 'train'"
    for var in ("KEEP_LAST", "KEEP_BEST", "BEST_METRIC", "BEST_MODE"):
        monkeypatch.setattr(metaflow_config, f"CHECKPOINT_{var}", None, raising=False)
    monkeypatch.setattr(metaflow_config, "CHECKPOINT_DEBRIS_GRACE", "21600", raising=False)

    def error(**attrs: Any) -> str:
        with pytest.raises(CheckpointConfigException) as info:
            retention_settings(attrs, where)
        return str(info.value)

    assert error(keep_last=0) == (f"{where}: keep_last=0 is not valid: expected an integer "
                                  ">= 1 (unset keeps every checkpoint).")
    assert "keep_best='two' is not valid" in error(keep_best="two")
    msg = error(keep_best=2)
    assert msg.startswith(f"{where}: keep_best=2 needs a metric") and "best_metric" in msg
    assert "METAFLOW_CHECKPOINT_BEST_METRIC" in msg
    assert "best_mode='median' is not valid: expected one of 'min', 'max'" in error(
        best_mode="median")
    assert "best_metric=3 is not valid" in error(best_metric=3)
    # Strings, as `--with checkpoint:keep_last=2` passes them, are parsed.
    policy, grace = retention_settings({"keep_last": "2", "best_mode": "MAX"}, where)
    assert (policy.keep_last, policy.best_mode, grace) == (2, "max", 21600.0)
    # The environment fills in what the decorator leaves unset, and no more.
    monkeypatch.setattr(metaflow_config, "CHECKPOINT_KEEP_LAST", "oops")
    assert error().startswith("METAFLOW_CHECKPOINT_KEEP_LAST='oops' is not valid")
    monkeypatch.setattr(metaflow_config, "CHECKPOINT_KEEP_LAST", "5")
    monkeypatch.setattr(metaflow_config, "CHECKPOINT_KEEP_BEST", "1")
    monkeypatch.setattr(metaflow_config, "CHECKPOINT_BEST_METRIC", "acc")
    monkeypatch.setattr(metaflow_config, "CHECKPOINT_DEBRIS_GRACE", "60")
    policy, grace = retention_settings({"keep_last": 3}, where)
    assert (policy.keep_last, policy.keep_best, policy.best_metric, grace) == (3, 1, "acc", 60)
    assert retention_settings({}, where)[0].active  # the environment's rules apply
