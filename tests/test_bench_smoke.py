"""The benchmark suite's code runs end to end (tiny sizes: the numbers mean nothing here).

The real run is ``tox -e bench``; this keeps its code from rotting between runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "suite.py"
QUICK = ["listing", "small_save", "save_scaling", "memory_peak", "load_throughput"]


def run_suite(tmp_path: Path, only: list[str]) -> dict[str, object]:
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(SUITE), "--quick", "--only", ",".join(only),
                           "--out", str(out), "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = (out / "results.md").read_text()
    assert table.startswith("| benchmark | ours (median) |") and "Machine:" in table
    result: dict[str, object] = json.loads((out / "results.json").read_text())
    return result


def test_suite_quick_run_writes_a_table_with_baselines(tmp_path: Path) -> None:
    rows = run_suite(tmp_path, QUICK)["rows"]
    assert isinstance(rows, list)
    names = [r["benchmark"] for r in rows]
    for expected in ("list() with 100 checkpoints", "choosing what to load at task start",
                     "1 KB save on S3", "save() blocking, one file of 16 MiB",
                     "save() blocking, 100 files", "peak RSS above baseline",
                     "load of a 0.0625 GiB checkpoint"):
        assert any(n.startswith(expected) for n in names), (expected, names)
    for r in rows:  # every figure comes with a baseline measured in the same run
        assert r["baseline"] is not None and r["baseline"] > 0, r
        assert r["samples"], r


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pins the loop and the upload "
                    "to two different CPUs")
def test_interference_quick_run(tmp_path: Path) -> None:
    rows = run_suite(tmp_path, ["interference"])["rows"]
    assert isinstance(rows, list)
    names = [r["benchmark"] for r in rows]
    for mode in ("thread", "process"):
        assert f"upload speed during the pure-Python loop ({mode})" in names
        assert f"training-loop speed while uploading (pure Python, {mode})" in names
    assert any(n.startswith("control:") for n in names)


def test_a_smoke_run_never_replaces_the_tracked_results(tmp_path: Path) -> None:
    tracked = SUITE.parent / "results" / "results.json"
    before = tracked.read_bytes() if tracked.exists() else None
    done = subprocess.run([sys.executable, str(SUITE), "--quick", "--only", "teardown",
                           "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "results-quick" in done.stdout
    smoke = json.loads((SUITE.parent / "results-quick" / "results.json").read_text())
    assert smoke["quick"] is True
    assert (tracked.read_bytes() if tracked.exists() else None) == before


@pytest.mark.slow
@pytest.mark.azure
def test_azure_emulator_quick_run(tmp_path: Path, store_kits: Any) -> None:
    store_kits.get("azure")  # skips, saying why, where Azurite cannot be had
    rows = run_suite(tmp_path, ["azure_emulator"])["rows"]
    assert isinstance(rows, list)
    assert [r["benchmark"].split(" (")[0] for r in rows] == [
        "Azure upload throughput", "Azure load throughput",
        "Python loop speed while an Azure upload runs"]
    for r in rows:
        assert r["baseline"] and r["value"] > 0 and "emulator" in r["note"], r
