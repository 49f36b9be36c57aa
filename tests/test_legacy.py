"""Moving from metaflow-checkpoint: what it wrote loads, and resumes, with this package.

The published ``metaflow-checkpoint`` 0.2.14 is installed into a virtual environment of its
own (made once and kept in a cache directory, see ``published.py``), and runs a flow in its
published style against a datastore shared with this package's flows, locally and on the
S3 server. Then, with this package, the same flow loads the references it returned
(``@model(load=...)``, ``current.checkpoint.load`` of a key, ``load_model``), resumes from
its checkpoints with ``eager``, and lists them; and a notebook (a script here) lists and
loads them too. Nothing is written in its layout.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from conftest import FLOWS, S3_BUCKET, RunFlow
from storekit import results

pytestmark = [pytest.mark.flow]

@pytest.fixture(scope="session")
def published_python() -> Path:
    """A Python with metaflow-checkpoint and the same Metaflow as ours, and not this package."""
    from published import PublishedUnavailable, published_python

    try:
        return published_python()
    except PublishedUnavailable as e:
        pytest.skip(str(e))


def _run_published(python: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run legacy_train.py with metaflow-checkpoint; its references per foreach value."""
    out = subprocess.run([str(python), str(FLOWS / "legacy_train.py"), "--no-pylint", "run"],
                         env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    r = results(out.stdout + out.stderr)
    return {v: json.loads(r[f"refs_{v}"]) for v in ("a", "b")}


NOTEBOOK = """
import json, os, sys
from metaflow import Checkpoint, load_model

refs = json.loads(sys.argv[1])
dest = sys.argv[2]

def tree(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f)).read()
            for d, _, fs in os.walk(root) for f in fs}

out = {}
load_model(refs["model_dir"], os.path.join(dest, "model"))
out["model"] = tree(os.path.join(dest, "model"))
load_model(refs["model_file"]["key"], os.path.join(dest, "file"))   # a key loads too
out["file"] = tree(os.path.join(dest, "file"))
load_model(json.dumps(refs["model_file"]), os.path.join(dest, "json"))  # and its JSON
out["json"] = tree(os.path.join(dest, "json"))
with Checkpoint() as cp:
    listed = cp.list(task=refs["task"])
    out["listed"] = [(c["name"], c["source"], c["key"] == refs["ckpt"]["key"] or
                      c["key"] == refs["ckpt_tar"]["key"]) for c in listed]
    cp.load(listed[-1], os.path.join(dest, "ckpt"))
    out["ckpt"] = tree(os.path.join(dest, "ckpt"))
# What `fresh` falls back to for a task metaflow-checkpoint ran: its newest latest=True save.
from metaflow_extensions.asynccheckpoint.plugins.shared import legacy
from metaflow_extensions.asynccheckpoint.plugins.checkpoint.api import _reader
from metaflow_extensions.asynccheckpoint.plugins.shared.reader import default_location
fresh = legacy.latest_for_task(_reader().catalog(*default_location()).engine, refs["task"])
out["fresh"] = [fresh.reference["name"], fresh.reference["source"], fresh.key]
bad = dict(refs["ckpt"], version_id=7)
try:
    load_model(bad, os.path.join(dest, "bad"))
    out["bad"] = "loaded"
except Exception as e:
    out["bad"] = str(e)
print("RESULT notebook=" + json.dumps(out))
"""


def _check(refs: dict[str, Any], ours: subprocess.CompletedProcess[str],
           notebook: subprocess.CompletedProcess[str]) -> None:
    text = ours.stdout + ours.stderr
    r = {k: json.loads(v) for k, v in results(text).items()}
    model = {"config.json": json.dumps({"item": "a"}), "tok/vocab.txt": "x y z"}
    assert r["model"] == model  # a tar archive, as metaflow-checkpoint stores models
    assert r["file"] == {"config.json": json.dumps({"item": "a"})}
    assert r["ckpt"] == {"state.txt": "epoch 3 of a", "sub/opt.bin": "o" * 300}
    assert r["by_key"] == {"state.txt": "epoch 4 of a", "sub/opt.bin": "o" * 300}
    assert r["load_model"] == model
    assert sorted(map(tuple, r["listed"])) == [("mfchckpt", "metaflow-checkpoint"),
                                               ("tarred", "metaflow-checkpoint")]
    for item in ("a", "b"):
        # eager: each foreach branch resumes from its own newest checkpoint of that package.
        assert r[f"resumed_{item}"] == {"state.txt": f"epoch 4 of {item}",
                                        "sub/opt.bin": "o" * 300}, item
        assert r[f"info_{item}"] == ["tarred", "metaflow-checkpoint"]
    assert text.count("loaded the latest checkpoint metaflow-checkpoint saved for this step "
                      "and foreach branch") == 2
    assert notebook.returncode == 0, notebook.stderr
    nb = json.loads(results(notebook.stdout)["notebook"])
    assert nb["model"] == model and nb["file"] == r["file"] == nb["json"]
    assert [x[:2] for x in nb["listed"]] == [["tarred", "metaflow-checkpoint"],
                                             ["mfchckpt", "metaflow-checkpoint"]]
    assert all(x[2] for x in nb["listed"])
    assert nb["ckpt"] == r["ckpt"]
    assert nb["fresh"] == ["tarred", "metaflow-checkpoint", refs["a"]["ckpt_tar"]["key"]]
    assert "version_id=7" in nb["bad"] and "metaflow-checkpoint stored version_id=0" in nb["bad"]


def _run_ours(run_flow: RunFlow, refs: dict[str, Any], env: dict[str, str], cwd: Path
              ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    ours = run_flow("legacy_resume.py", "--refs", json.dumps(refs["a"]), env=env)
    notebook = subprocess.run(
        [sys.executable, "-c", NOTEBOOK, json.dumps(refs["a"]), str(cwd / "notebook")],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    return ours, notebook


def _local_layout(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for top in ("mf.checkpoints/checkpoints", "mf.models/models")
            for p in (root / top).rglob("*") if p.is_file()}


# Runs the published package's flow in its own environment, then ours: the slow tier, with
# the same on S3. (tests/test_legacy_archive.py reads that package's layout, written by
# hand, in the default run.)
@pytest.mark.slow
def test_references_and_checkpoints_of_metaflow_checkpoint_on_the_local_store(
        published_python: Path, run_flow: RunFlow, flow_env: dict[str, str], tmp_path: Path,
        datastore_root: Path) -> None:
    refs = _run_published(published_python, flow_env, tmp_path)
    before = _local_layout(datastore_root)
    assert before, "metaflow-checkpoint wrote nothing where this test expects its layout"
    ours, notebook = _run_ours(run_flow, refs, flow_env, tmp_path)
    _check(refs, ours, notebook)
    assert _local_layout(datastore_root) == before  # read-only: not a byte or mtime changed

    # A checkpoint of that package that cannot be loaded never keeps a task from starting:
    # branch b says so and starts without it; branch a resumes as before.
    tar_b = datastore_root / refs["b"]["ckpt_tar"]["key"]
    tar_b.write_bytes(tar_b.read_bytes()[:100])
    again = run_flow("legacy_resume.py", "--refs", json.dumps(refs["a"]), env=flow_env)
    text = again.stdout + again.stderr
    r = {k: json.loads(v) for k, v in results(text).items()}
    assert r["resumed_b"] == {} and r["info_b"] is None
    assert r["resumed_a"]["state.txt"] == "epoch 4 of a"
    assert "ERROR: could not load the metaflow-checkpoint checkpoint of this step and foreach " \
           "branch" in text and "has 100 bytes, but" in text, text

    # Verified what can be: a files checkpoint missing bytes is refused, naming the file and
    # key, and nothing lands in the destination.
    victim = datastore_root / refs["a"]["ckpt"]["key"] / "sub" / "opt.bin"
    victim.write_text("o" * 10)
    dest = tmp_path / "after-corruption"
    script = ("import json, sys; from metaflow import load_model\n"
              "load_model(json.loads(sys.argv[1]), sys.argv[2])")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(refs["a"]["ckpt"]),
                          str(dest)], env=flow_env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "312 were stored" in out.stderr and refs["a"]["ckpt"]["key"] in out.stderr
    assert not dest.exists() or [p.name for p in dest.iterdir()] == []

    # A hostile archive (a name leaving the destination) of the stored size is refused.
    archive = datastore_root / refs["a"]["model_dir"]["key"]
    size = archive.stat().st_size
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo("../escaped.txt")
        member.size = 1
        tar.addfile(member, io.BytesIO(b"x"))
    assert archive.stat().st_size == size  # so only the archive's content can refuse it
    dest = tmp_path / "deep" / "after-hostile-archive"
    out = subprocess.run([sys.executable, "-c", script, json.dumps(refs["a"]["model_dir"]),
                          str(dest)], env=flow_env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "unsafe path '../escaped.txt'" in out.stderr, out.stderr
    assert not (dest.parent / "escaped.txt").exists()
    assert not dest.parent.exists()  # the directories the load made for it are gone again


@pytest.mark.s3
@pytest.mark.slow
def test_references_and_checkpoints_of_metaflow_checkpoint_on_s3(
        published_python: Path, run_flow: RunFlow, s3_env: dict[str, str], s3_server: Any,
        tmp_path: Path) -> None:
    refs = _run_published(published_python, s3_env, tmp_path)
    client = s3_server.client()

    def layout() -> dict[str, tuple[int, str]]:
        return {o["Key"]: (o["Size"], o["ETag"])
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET)
                for o in page.get("Contents", ())
                if o["Key"].startswith(("metaflow/mf.checkpoints/checkpoints/",
                                        "metaflow/mf.models/models/"))}

    before = layout()
    assert any(k.endswith(".metadata") for k in before)
    ours, notebook = _run_ours(run_flow, refs, s3_env, tmp_path)
    _check(refs, ours, notebook)
    assert layout() == before
