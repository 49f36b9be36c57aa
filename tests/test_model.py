"""``@model``, ``current.model`` and ``load_model``, as metaflow-checkpoint documents them,
on both stores: a flow saves a directory and a file, a later step loads them by artifact
name, and a notebook (a script here) loads them afterwards."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cardkit import by_id, card_payload, read_cards
from conftest import S3_BUCKET, RunFlow
from storekit import results

pytestmark = pytest.mark.flow

TOKENIZER = {"config.json": json.dumps({"layers": 2}), "tokenizer/vocab.txt": "a b c"}
WEIGHTS = {"weights.bin": "w" * 1000}

NOTEBOOK = """
import json, os, sys
from metaflow import Flow, load_model, namespace

namespace(None)
run = Flow("ModelFlow").latest_run
out = {}
for name in ("my_model", "weights"):
    target = os.path.join(sys.argv[1], name)
    load_model(run.data.__getattr__(name), target)
    out[name] = {os.path.relpath(os.path.join(d, f), target): open(os.path.join(d, f)).read()
                 for d, _, fs in os.walk(target) for f in fs}
ref = run.data.my_model
out["ref"] = {k: ref[k] for k in ("type", "label", "metadata", "storage_format", "size")}
out["uuid"] = ref["model_uuid"].startswith("my_model_")
meta = {s: run[s].task.metadata_dict for s in ("start", "evaluate")}
out["saved_meta"] = json.loads(meta["start"]["saved-models"])["keys"]
out["loaded_meta"] = json.loads(meta["evaluate"]["loaded-models"])["keys"]
print("RESULT notebook=" + json.dumps(out))
"""


def _check_run(out: subprocess.CompletedProcess[str]) -> list[str]:
    text = out.stdout + out.stderr
    r = {k: json.loads(v) for k, v in results(text).items()}
    # Drained at the end of the task, each engine its own, with @checkpoint on the step too.
    assert "[@model] 2 of 2 model(s) of this attempt committed." in text
    assert "[@checkpoint] 1 of 1 checkpoint(s) of this attempt committed." in text
    assert r["loaded_model"] == TOKENIZER
    assert r["loaded_weights"] == WEIGHTS
    assert r["load_again"] == WEIGHTS
    assert r["loaded_ckpt"] == {"state.txt": "epoch 3"}  # a checkpoint loads by @model too
    assert r["info"] == {"epochs": 10, "learning-rate": 0.001}
    assert r["load_model"] == TOKENIZER
    # Models live in a tree of their own, never among the checkpoints.
    assert all(k.startswith("mf.models/ModelFlow/") for k in r["saved"]), r["saved"]
    return list(r["saved"])


def _notebook(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    target = cwd / "notebook"
    out = subprocess.run([sys.executable, "-c", NOTEBOOK, str(target)], env=env, cwd=cwd,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found: dict[str, Any] = json.loads(results(out.stdout)["notebook"])
    return found


def _check_notebook(nb: dict[str, Any], saved: list[str]) -> None:
    assert nb["my_model"] == TOKENIZER and nb["weights"] == WEIGHTS
    # Task metadata names what was saved and loaded, as metaflow-checkpoint registers it.
    assert nb["saved_meta"] == saved
    assert nb["loaded_meta"][:2] == saved and len(nb["loaded_meta"]) == 3
    assert nb["ref"] == {"type": "model", "label": "my_model", "storage_format": "files",
                         "metadata": {"epochs": 10, "learning-rate": 0.001},
                         "size": sum(len(v) for v in TOKENIZER.values())}
    assert nb["uuid"]


def test_model_flow_in_the_published_style_on_the_local_store(
        run_flow: RunFlow, flow_env: dict[str, str], tmp_path: Path) -> None:
    # As users run it: Metaflow writes local cards under the .metaflow nearest the working
    # directory, and reads them from the datastore root, so the two are made the same.
    flow_env = {**flow_env, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path)}
    datastore_root = tmp_path / ".metaflow"
    saved = _check_run(run_flow("model_flow.py", env=flow_env))
    # Checksummed like checkpoints: every stored file matches its manifest.
    for key in saved:
        m = json.loads((datastore_root / key).read_text())
        head = key.rpartition("/manifests/")[0]
        for f in m["files"]:
            data = (datastore_root / head / "data" / m["run_id"] / m["checkpoint_id"]
                    / f["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"]
    assert not list((datastore_root / "mf.checkpoints").rglob("*my_model*"))
    _check_notebook(_notebook(flow_env, tmp_path), saved)
    # The card lists the models a step saved, and those a step loaded.
    saved_md = _model_card("start", flow_env, tmp_path)
    assert "| 1 | my\\_model | committed | 2 |" in saved_md, saved_md
    assert "| 2 | weights | committed | 1 |" in saved_md, saved_md
    loaded_md = _model_card("evaluate", flow_env, tmp_path)
    for name in ("my\\_model", "weights", "ckpt"):
        assert f"| {name} |" in loaded_md.split("### Saved")[0], loaded_md


def _model_card(step: str, env: dict[str, str], cwd: Path) -> str:
    cards = [c for c in read_cards("ModelFlow", step, env=env, cwd=cwd) if c["id"] == "model"]
    assert len(cards) == 1, cards
    return str(by_id(card_payload(cards[0]["html"]), "model-models")["source"])


# The same flow on the local store is in the default run; this one, in the slow tier.
@pytest.mark.slow
@pytest.mark.s3
def test_model_flow_in_the_published_style_on_s3(run_flow: RunFlow, s3_env: dict[str, str],
                                                  s3_server: Any, tmp_path: Path) -> None:
    saved = _check_run(run_flow("model_flow.py", env=s3_env))
    keys = [o["Key"] for page in s3_server.client().get_paginator("list_objects_v2").paginate(
        Bucket=S3_BUCKET) for o in page.get("Contents", ())]
    for key in saved:
        assert f"metaflow/{key}" in keys
    _check_notebook(_notebook(s3_env, tmp_path), saved)


def test_bad_load_argument_names_the_step_and_the_entry(run_flow: RunFlow) -> None:
    out = run_flow("model_flow.py", "--with", "model:load=[3]", check=False)
    assert out.returncode != 0
    assert "each entry must be an artifact name" in out.stdout + out.stderr


def test_a_missing_artifact_fails_unless_best_effort(run_flow: RunFlow) -> None:
    import metaflow  # noqa: F401  (first: it loads the extension's plugins)

    from metaflow_extensions.asynccheckpoint.plugins.model.decorator import parse_load

    assert parse_load("m", "w") == [("m", None)]
    assert parse_load(["a", ("b", "/x"), ("c", None)], "w") == [
        ("a", None), ("b", "/x"), ("c", None)]
    out = run_flow("model_flow.py", "--with", "model:load=nope", check=False)
    assert out.returncode != 0
    assert "self.nope is not set" in out.stdout + out.stderr
    out = run_flow("model_flow.py", "--with", "model:load=nope,best_effort_load=True")
    assert "best_effort_load=True: going on without it" in out.stdout + out.stderr


# -- the engine and layout pieces models and the legacy reader stand on ----------------------

def test_models_scope_is_its_own_tree_and_round_trips() -> None:
    from uploader import MODELS_PREFIX, ROOT_PREFIX, Scope

    m = Scope("F", "user:t", "train", ("i0",), root=MODELS_PREFIX)
    c = Scope("F", "user:t", "train", ("i0",))
    assert m.prefix.startswith("mf.models/") and c.prefix.startswith(ROOT_PREFIX + "/")
    assert m.prefix.split("/")[1:] == c.prefix.split("/")[1:]
    for scope in (m, c):
        back = Scope.from_prefix(scope.prefix)
        assert back.prefix == scope.prefix and back.root == scope.root
    with pytest.raises(ValueError, match="not a scope root"):
        Scope("F", "user:t", "train", root="mf.other")


def test_fetch_is_all_or_nothing_and_checks_sizes(tmp_path: Path) -> None:
    from enginekit import make_engine

    from uploader import LoadError

    store = tmp_path / "store" / "other"
    (store / "d").mkdir(parents=True)
    (store / "a.txt").write_bytes(b"alpha")
    (store / "d" / "b.txt").write_bytes(b"beta!")
    engine = make_engine(tmp_path)
    try:
        objects = [("other/a.txt", "a.txt", 5), ("other/d/b.txt", "d/b.txt", None)]
        dest = tmp_path / "dest"
        got = engine.fetch(objects, str(dest), who="thing", total=10)
        assert [n for n, _ in got] == [5, 5]
        assert (dest / "d" / "b.txt").read_bytes() == b"beta!"
        for bad, total, why in (
                ([("other/a.txt", "a.txt", 4)], None, "has 5 bytes, but 4 were stored"),
                (objects, 11, "hold 10 bytes, but 11 were stored"),
                ([("other/a.txt", "a.txt", 5), ("other/gone", "g", None)], None, "other/gone"),
                ([("other/a.txt", "../a.txt", 5)], None, "unsafe path")):
            fresh = tmp_path / f"fresh-{why[:4]}"
            with pytest.raises((LoadError, ValueError), match=why):
                engine.fetch(bad, str(fresh), who="thing", total=total)
            assert not fresh.exists() or list(fresh.iterdir()) == [], why
    finally:
        engine.close()


def test_a_failed_attempt_commits_the_models_it_saved(run_flow: RunFlow, tmp_path: Path,
                                                     datastore_root: Path) -> None:
    out = run_flow("model_retry_flow.py")
    assert "Bad luck on purpose" in out.stdout + out.stderr
    found = sorted((datastore_root / "mf.models").rglob("manifests/*/*.json"))
    stored = [json.loads(p.read_text()) for p in found]
    assert sorted(m["name"] for m in stored) == ["attempt0", "attempt1"]
    assert all(not m["latest"] for m in stored)  # a model is never what a retry resumes from
    assert not (datastore_root / "mf.checkpoints").exists()
