"""The examples, run exactly as the README tells users to: ``python examples/<name>.py run``.

Each example fails on purpose in the first attempt of its training step, and ``@retry``
must resume it from a checkpoint. Resuming is checked three ways: the log says so, the
stored checkpoints are the ones the example saved, and the final metric equals that of
a run that never failed (each example seeds everything, so an exact resume reproduces
it to the printed digit, and a resume that lost the optimizer or the shuffle order
does not).
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from storekit import manifests, verify_all

pytestmark = pytest.mark.flow

EXAMPLES = Path(__file__).parent.parent / "examples"
# Each example takes seconds; the bound only keeps a hung run from hanging the suite.
TIMEOUT = 240

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch cannot be imported: install the extra with pip install '.[torch]'")
needs_xgboost = pytest.mark.skipif(
    importlib.util.find_spec("xgboost") is None,
    reason="xgboost cannot be imported: install the extra with pip install '.[xgboost]'")


def run_example(name: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run an example on a private local datastore under ``cwd``; return its whole log."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
    full_env.update({
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(cwd / "ds"),
        "USERNAME": "tester",
        "PYTHONUNBUFFERED": "1",
        # A local @parallel step starts its ranks but the first with the `python` on PATH.
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        **(env or {}),
    })
    with subprocess.Popen(
        [sys.executable, str(EXAMPLES / name), "run", *args], cwd=cwd, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    ) as p:
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            # Kill the flow's tasks too, not only the runtime.
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            raise
    assert p.returncode == 0, f"{' '.join([name, *args])} exited {p.returncode}\n{out}"
    return out


def final_line(text: str, unit: str, metric: str) -> tuple[int | None, str]:
    """(the epoch or round resumed from, or None; the final metric as printed)."""
    m = re.search(rf"(?:Resumed from {unit} (\d+)|Trained .*without a resume); "
                  rf"final {metric} (\d+\.\d+)$", text, re.MULTILINE)
    assert m, f"no final line in the output:\n{text}"
    return (int(m.group(1)) if m.group(1) else None), m.group(2)


def first_value(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} is not in the output:\n{text}"
    return float(m.group(1))


def committed(cwd: Path, key: str) -> set[tuple[int, int]]:
    """(attempt, metadata[key]) of every committed checkpoint, each verified byte for byte."""
    root = cwd / "ds" / ".metaflow"
    found = {(int(m.identity["attempt"]), int(m.metadata[key])) for _, m in manifests(root)}
    assert verify_all(root) == len(found)
    return found


Uninterrupted = Callable[[str, str, str], str]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Uninterrupted:
    """The final metric of an example run with ``--fail-at -1``, run once per module."""
    cache: dict[str, str] = {}

    def final(name: str, unit: str, metric: str) -> str:
        if name not in cache:
            cwd = tmp_path_factory.mktemp(name.removesuffix(".py"))
            text = run_example(name, "--fail-at", "-1", cwd=cwd)
            resumed, value = final_line(text, unit, metric)
            assert resumed is None and "Deliberate failure" not in text, text
            cache[name] = value
        return cache[name]

    return final


@needs_torch
@pytest.mark.parametrize("copy_budget", [
    pytest.param(None, id="as-written"),
    pytest.param("0", id="every-file-linked", marks=pytest.mark.slow)])
def test_pytorch_example_resumes_model_and_optimizer(
        tmp_path: Path, uninterrupted: Uninterrupted, copy_budget: str | None) -> None:
    # With no copy budget, state.pt is hardlinked into each snapshot and torch.save's
    # in-place rewrite of it races the upload: the path a large model takes.
    env = {} if copy_budget is None else {"METAFLOW_CHECKPOINT_COPY_BUDGET": copy_budget}
    text = run_example("pytorch_resume.py", cwd=tmp_path, env=env)
    assert "Deliberate failure after epoch 3 of the first attempt" in text
    assert "Loaded checkpoint" in text
    assert "Resuming at epoch 4 from the checkpoint of epoch 3 (saved by attempt 0)" in text
    resumed, final = final_line(text, "epoch", "loss")
    assert resumed == 3
    assert float(final) < first_value(text, r"epoch 0 loss (\d+\.\d+)")
    assert final == uninterrupted("pytorch_resume.py", "epoch", "loss")

    saved = committed(tmp_path, "epoch")
    if copy_budget is None:
        # state.pt is far below the default copy budget: each save copies it, so every
        # epoch's checkpoint commits.
        assert saved == {(0, e) for e in range(4)} | {(1, e) for e in range(4, 8)}
    else:
        # The last save of an attempt always commits; a rewrite in place costs at most
        # one checkpoint in each attempt before the file is frozen by copying.
        assert {(0, 3), (1, 7)} <= saved
        assert len([a for a, _ in saved if a == 0]) >= 3, saved
        assert len([a for a, _ in saved if a == 1]) >= 3, saved


@pytest.mark.slow  # imports xgboost in each of four tasks; the PyTorch example runs by default
@needs_xgboost
def test_xgboost_example_resumes_the_booster(tmp_path: Path,
                                             uninterrupted: Uninterrupted) -> None:
    text = run_example("xgboost_resume.py", cwd=tmp_path)
    assert "Deliberate failure after round 35 of the first attempt" in text
    assert "Loaded checkpoint" in text
    assert "Resuming at round 30 from the checkpointed booster (saved by attempt 0)" in text
    resumed, final = final_line(text, "round", "validation rmse")
    assert resumed == 30
    assert float(final) < first_value(text, r"round 10 valid rmse (\d+\.\d+)")
    assert final == uninterrupted("xgboost_resume.py", "round", "validation rmse")
    assert committed(tmp_path, "round") == {(0, 10), (0, 20), (0, 30),
                                            (1, 40), (1, 50), (1, 60)}


def test_callback_example_saves_through_the_checkpoint_class(
        tmp_path: Path, uninterrupted: Uninterrupted) -> None:
    text = run_example("callback_checkpoint.py", cwd=tmp_path)
    assert "Deliberate failure after epoch 6 of the first attempt" in text
    assert "Loaded checkpoint" in text
    assert ("Resuming at epoch 7 from the checkpoint 'trainer' of epoch 6 "
            "(saved by attempt 0)") in text
    resumed, final = final_line(text, "epoch", "loss")
    assert resumed == 6
    assert float(final) < first_value(text, r"epoch 0 loss (\d+\.\d+)")
    assert final == uninterrupted("callback_checkpoint.py", "epoch", "loss")
    assert committed(tmp_path, "epoch") == {(0, e) for e in range(7)} | {
        (1, e) for e in range(7, 15)}
    # The callback saved a file path: each checkpoint holds that one file, under its name,
    # which is what lets the retry find it in current.checkpoint.directory.
    for _, m in manifests(tmp_path / "ds" / ".metaflow"):
        assert m.name == "trainer"
        assert [f.path for f in m.files] == ["trainer_state.json"]


def test_finetune_example_skips_the_frozen_base_and_keeps_last_and_best(tmp_path: Path) -> None:
    out = run_example("finetune_retention.py", "--base-mib", "2", cwd=tmp_path)
    # Attempt 0 saves epochs 0..6 and fails at 7; the retry loads 6 and saves 7..11.
    assert "Resumed at epoch 7" in out, out
    # Every save of the retry skips the unchanged 2 MiB base, its first one included: it
    # compares with the checkpoint it loaded. (In attempt 0 a save skips it only if the
    # save before had committed when its upload began.)
    first, _, retry = out.partition("Task is starting (retry)")
    # The log's line per commit says how much was uploaded: a few KiB, or all of it.
    skipped = r"committed 'mfchckpt' #\d+: 2\.\d MiB, [\d.]+ (B|KiB) uploaded in "
    assert len(re.findall(skipped, retry)) == 5, out
    assert re.search(r"committed 'mfchckpt' #1: 2\.\d MiB, all uploaded in ", first), out
    # The 3 newest, the 2 best by val_loss (epochs 3 and 4), and the one the retry loaded
    # (6): the task's end waited for the last prune.
    assert "Kept checkpoints of epochs [3, 4, 6, 9, 10, 11]" in out, out
    root = tmp_path / "ds" / ".metaflow"
    kept = sorted(int(m.metadata["epoch"]) for _, m in manifests(root))
    assert kept == [3, 4, 6, 9, 10, 11]
    assert verify_all(root) == 6  # every kept one is whole, following its pointers


def parallel_result(text: str) -> str:
    m = re.search(r"^.*RESULT (loss=\d+\.\d+ checksum=[0-9a-f]+)$", text, re.MULTILINE)
    assert m, f"no RESULT line in the output:\n{text}"
    return m.group(1)


# Two runs of three ranks that each import torch, a retry among them: the longest case of the
# default run, in the slow tier; test_gang.py's gang flows cover the resume of every rank.
@pytest.mark.slow
@needs_torch
def test_parallel_example_resumes_every_rank_from_its_shard(tmp_path: Path) -> None:
    # The two runs side by side: each derives its rendezvous ports from its own run id.
    (tmp_path / "clean").mkdir()
    with ThreadPoolExecutor(2) as pool:
        never_failed = pool.submit(run_example, "parallel_train.py", "--fail-at", "-1",
                                   cwd=tmp_path / "clean")
        text = run_example("parallel_train.py", cwd=tmp_path)
        clean = never_failed.result()
    assert "Deliberate failure" not in clean and "RESUMED" not in clean, clean
    assert "Trained without a resume" in clean, clean

    assert "Deliberate failure of rank 1 after step 5 of the first attempt" in text
    # Every rank loaded its own shard of the one gang checkpoint rank 0 chose: step 5,
    # the last that all three committed before rank 1 failed.
    resumed = sorted((int(r), int(s)) for r, s in re.findall(r"RESUMED rank=(\d+) step=(\d+)",
                                                             text))
    assert resumed == [(0, 5), (1, 5), (2, 5)], text
    assert "Resumed every rank from its shard of step 5" in text
    # Each shard came back with its optimizer state: the final model is the one a run
    # that never failed trained, to the bit.
    assert parallel_result(text) == parallel_result(clean)

    # Each rank's parts: steps 0..5 in the first attempt, 6..9 in the retry.
    root = tmp_path / "ds" / ".metaflow"
    parts = manifests(root)
    saved = {(int(m.identity["attempt"]), int(m.identity["gang"]["rank"]),
              int(m.metadata["step"])) for _, m in parts}
    assert saved == {(0, r, s) for r in range(3) for s in range(6)} | {
        (1, r, s) for r in range(3) for s in range(6, 10)}
    assert all(m.identity["gang"]["rank"] == m.metadata["rank"] for _, m in parts)
    assert verify_all(root) == len(saved)
