"""Distributed training: the ranks of a @parallel gang, and the processes a task starts,
checkpoint as one job.

Engine level: the save counter shared by processes, gang checkpoints that exist only once
every participant committed, retention that keeps and deletes them whole. Flows: a local
``num_parallel=3`` gang with @checkpoint, @model and @retry in the sharded, diverging and
replicated patterns, and a task whose saves come from two helper processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cardkit import card_payload
from conftest import FLOWS, RunFlow
from enginekit import SCOPE
from storekit import manifests, results, verify_all
from treekit import local_engine, write_tree

from uploader import CheckpointKeys, Engine, RetentionPolicy, SaveRequest, new_checkpoint_id
from uploader.catalog import Catalog
from uploader.gang import GANG_FIELD, GangMember, GangPart, marker_key
from uploader.retention import plan_prune, prune
from uploader.sequence import SaveSequence

# -- the save counter every process of a task shares ----------------------------------------


def _count(path: str, n: int, out: Any) -> None:
    seq = SaveSequence(path)
    out.put([seq.next("ck" if i % 2 else "best") for i in range(n)])


def test_processes_of_a_task_share_one_save_counter(tmp_path: Path) -> None:
    path = str(tmp_path / "sequence")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_count, args=(path, 200, out)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    seqs = sorted(s for run in got for s, _ in run)
    # Every save has its own number: no two processes counted from the same start.
    assert seqs == list(range(600))
    # And each process's saves are in its own order.
    for run in got:
        assert [s for s, _ in run] == sorted(s for s, _ in run)
    # Per name, the counts are unique too: 300 saves of each.
    by_name = sorted(n for run in got for i, (_, n) in enumerate(run) if i % 2)
    assert by_name == list(range(300))


def test_a_process_without_a_counter_file_counts_alone() -> None:
    seq = SaveSequence(None)
    assert [seq.next("a"), seq.next("b"), seq.next("a")] == [(0, 0), (1, 0), (2, 1)]


# -- gang checkpoints in a store ------------------------------------------------------------


GANG = "17"


def _part(engine: Engine, tmp: Path, *, rank: int, step: int, size: int = 3,
          attempt: int = 0, declare: bool = True, run: str = "1",
          metadata: dict[str, Any] | None = None) -> CheckpointKeys:
    """Commit rank ``rank``'s part of gang step ``step`` (its ``step``-th save)."""
    member = GangMember(GANG, rank, size)
    if declare:
        engine.run(engine.backend.put_bytes, marker_key(SCOPE.prefix, run, member, attempt),
                   b"{}")
    src = tmp / f"src-{rank}-{step}-{attempt}"
    write_tree(src, {"shard.json": json.dumps({"rank": rank, "step": step}).encode()})
    task = GANG if rank == 0 else f"{GANG}_node_{rank}"
    keys = CheckpointKeys(SCOPE.prefix, run, new_checkpoint_id(task, attempt))
    gang = {**member.as_dict(), "step": GangPart.step_key(attempt, "ck", step), "nth": step}
    handle = engine.save(SaveRequest(
        source=str(src), keys=keys, name="ck", latest=True,
        metadata={"step": step, **(metadata or {})},
        identity={"task_id": task, "attempt": attempt, GANG_FIELD: gang},
        reference={"created_on": "now"}))
    handle.wait(60)
    return keys


def _steps(entries: list[Any]) -> list[int]:
    return [e.manifest.metadata["step"] for e in entries]


def test_a_gang_checkpoint_exists_once_every_participant_committed(tmp_path: Path) -> None:
    engine = local_engine(tmp_path)
    try:
        cat = Catalog(engine)
        for step in range(3):
            _part(engine, tmp_path, rank=0, step=step)
            _part(engine, tmp_path, rank=1, step=step)
        # Rank 2 declared itself and committed only step 0 and 1.
        _part(engine, tmp_path, rank=2, step=0)
        _part(engine, tmp_path, rank=2, step=1)
        got = cat.select(SCOPE.prefix, run_id="1", gang_id=GANG)
        assert _steps(got) == [1, 0]  # step 2 lacks rank 2's part
        assert all(e.gang is not None and e.gang.complete for e in got)
        # Each rank is given its own part; incomplete ones show only when asked for.
        mine = cat.select(SCOPE.prefix, run_id="1", gang_id=GANG, rank=2)
        assert [json.loads((tmp_path / "store" / e.keys.data("shard.json")).read_bytes())
                for e in mine] == [{"rank": 2, "step": 1}, {"rank": 2, "step": 0}]
        every = cat.entries(SCOPE.prefix, incomplete=True)
        assert _steps(every) == [2, 1, 0] and every[0].gang is not None
        assert every[0].gang.missing == [2]
        # A task's view (by its task id) finds the gang through its own part.
        assert _steps(cat.select(SCOPE.prefix, task_id=f"{GANG}_node_1")) == [1, 0]
    finally:
        engine.close()


def test_ranks_that_never_save_load_the_lowest_ranks_part(tmp_path: Path) -> None:
    engine = local_engine(tmp_path)
    try:
        for step in range(2):
            _part(engine, tmp_path, rank=0, step=step)
        got = Catalog(engine).select(SCOPE.prefix, gang_id=GANG, rank=2)
        # Only rank 0 saves (replicated): every checkpoint is complete, and rank 2 loads
        # rank 0's part.
        assert _steps(got) == [1, 0]
        assert got[0].task_id == GANG
    finally:
        engine.close()


def test_rank_0s_first_save_alone_is_not_trusted_as_replicated(tmp_path: Path) -> None:
    engine = local_engine(tmp_path)
    try:
        _part(engine, tmp_path, rank=0, step=0)
        only = Catalog(engine).select(SCOPE.prefix)
        # Ranks 1 and 2 may have died before their first save could declare them.
        assert only[0].gang is not None and only[0].gang.maybe_torn_gang
        _part(engine, tmp_path, rank=0, step=1)
        newest = Catalog(engine).select(SCOPE.prefix)[0]
        # Past a second save (a collective later), a rank that saves would have declared.
        assert newest.gang is not None and not newest.gang.maybe_torn_gang
        # Rank 2 never declared, ranks 0 and 1 did: their first step is as doubtful.
        _part(engine, tmp_path, rank=1, step=0)
        first = Catalog(engine).select(SCOPE.prefix)[-1]
        assert first.gang is not None and first.gang.maybe_torn_gang
        # A sharded gang's first step, once every rank committed, is just complete.
        _part(engine, tmp_path, rank=2, step=0)
        first = Catalog(engine).select(SCOPE.prefix)[-1]
        assert first.gang is not None and first.gang.complete
        assert not first.gang.maybe_torn_gang
    finally:
        engine.close()


def test_a_rank_that_declared_but_committed_nothing_holds_every_step_back(
        tmp_path: Path) -> None:
    engine = local_engine(tmp_path)
    try:
        _part(engine, tmp_path, rank=0, step=0)
        engine.run(engine.backend.put_bytes,
                   marker_key(SCOPE.prefix, "1", GangMember(GANG, 1, 3), 0), b"{}")
        assert Catalog(engine).select(SCOPE.prefix) == []
    finally:
        engine.close()


def test_retention_keeps_and_deletes_whole_gang_checkpoints(tmp_path: Path) -> None:
    engine = local_engine(tmp_path)
    try:
        for step in range(4):
            for rank in range(3):
                if not (step == 3 and rank == 2):  # step 3 is still in flight on rank 2
                    _part(engine, tmp_path, rank=rank, step=step)
        cat = Catalog(engine)
        plan = plan_prune(cat, SCOPE.prefix, RetentionPolicy(keep_last=1), run_id="1")
        # Kept: the newest complete one (step 2) and the one in flight (3), every part.
        assert sorted(e.manifest.metadata["step"] for e in plan.keep) == [2, 2, 2, 3, 3]
        assert sorted(e.manifest.metadata["step"] for e in plan.delete) == [0, 0, 0, 1, 1, 1]
        report = prune(cat, SCOPE.prefix, RetentionPolicy(keep_last=1), run_id="1")
        assert report.checkpoints_deleted == 6 and not report.errors
        # Rank 2 commits step 3: it is complete, step 2 goes, whole.
        _part(engine, tmp_path, rank=2, step=3)
        prune(cat, SCOPE.prefix, RetentionPolicy(keep_last=1), run_id="1")
        left = cat.entries(SCOPE.prefix, incomplete=True)
        assert _steps(left) == [3] and left[0].gang is not None
        assert sorted(left[0].gang.parts) == [0, 1, 2]
        assert verify_all(tmp_path / "store") == 3
    finally:
        engine.close()


def test_retention_drops_an_incomplete_gang_checkpoint_once_a_newer_one_is_complete(
        tmp_path: Path) -> None:
    engine = local_engine(tmp_path)
    try:
        _part(engine, tmp_path, rank=0, step=0)
        _part(engine, tmp_path, rank=1, step=0)  # rank 2's part of step 0 never came
        for rank in range(3):
            _part(engine, tmp_path, rank=rank, step=1)
        plan = plan_prune(Catalog(engine), SCOPE.prefix, RetentionPolicy(keep_last=5))
        assert _steps(list(plan.delete)) == [0, 0]
        assert "incomplete gang checkpoint" in plan.reasons[plan.delete[0].keys.checkpoint_id]
    finally:
        engine.close()


def test_an_older_reader_skips_a_part_instead_of_taking_it_for_a_checkpoint(
        tmp_path: Path) -> None:
    engine = local_engine(tmp_path)
    try:
        keys = _part(engine, tmp_path, rank=0, step=0)
    finally:
        engine.close()
    raw = json.loads((tmp_path / "store" / keys.manifest).read_bytes())
    assert raw["min_reader"] == 3 and raw["identity"][GANG_FIELD]["rank"] == 0


# -- flows, as users run them ---------------------------------------------------------------


def _gang_env(mode: str) -> dict[str, str]:
    # Local @parallel starts the other ranks with the `python` on PATH.
    bindir = os.path.dirname(sys.executable)
    return {"GANG_MODE": mode, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}


def _gang_results(out: str) -> dict[str, Any]:
    """``RESULT key=<JSON>`` lines of a gang's ranks, parsed, the last of each key winning.

    Found anywhere in the text: the ranks of a local gang share one output stream, and two
    ranks' lines can land on one line of the log.
    """
    decoder = json.JSONDecoder()
    found = {}
    for m in re.finditer(r"RESULT (\w+)=", out):
        found[m[1]] = decoder.raw_decode(out, m.end())[0]
    return found


def _loaded(out: str) -> dict[int, Any]:
    r = _gang_results(out)
    return {rank: r[f"loaded{rank}"] for rank in range(3) if f"loaded{rank}" in r}


@pytest.mark.flow
def test_a_sharded_gang_resumes_every_rank_from_the_same_step(
        run_flow: RunFlow, datastore_root: Path, flow_env: dict[str, str],
        tmp_path: Path) -> None:
    proc = run_flow("gang_flow.py", env=_gang_env("sharded"))
    out = proc.stdout + proc.stderr
    # Ranks 0 and 2 saved steps 0-5, rank 1 0-3 before it failed: all resume from 3, each
    # from its own shard.
    loaded = [v for v in _loaded(out).values() if v is not None]
    assert sorted(loaded, key=lambda d: d["rank"]) == [
        {"rank": r, "step": 3} for r in range(3)], out
    assert "Subprocess failed" in out and "Task is starting (retry)" in out
    r = _gang_results(out)
    assert r["models"] == ["rank0", "rank1", "rank2"]
    for rank in range(3):
        listed = r[f"listed{rank}"]
        assert listed == sorted(listed, reverse=True), listed
        assert 3 in listed
    # Every part of every rank is stored and whole.
    found = manifests(datastore_root)
    assert {m.identity[GANG_FIELD]["rank"] for _, m in found} == {0, 1, 2}
    assert verify_all(datastore_root) == len(found)
    # The command line shows one row per gang checkpoint, with its ranks.
    env = {**flow_env, **_gang_env("sharded")}
    cli = [sys.executable, str(FLOWS / "gang_flow.py"), "checkpoint"]
    listed = json.loads(subprocess.run([*cli, "list", "--json"], env=env, cwd=tmp_path,
                                       capture_output=True, text=True, check=True).stdout)
    rows = listed["checkpoints"]
    # Attempt 0: steps 0-3 complete (4 and 5 lack rank 1); attempt 1: steps 4 and 5.
    assert len(rows) == 6, rows
    assert all(r["gang"]["complete"] and len(r["gang"]["ranks"]) == 3 for r in rows)
    assert {r["gang"]["ranks"]["2"]["task_id"] for r in rows} == {
        rows[0]["task_id"] + "_node_2"}
    with_incomplete = json.loads(subprocess.run(
        [*cli, "list", "--json", "--incomplete"], env=env, cwd=tmp_path, capture_output=True,
        text=True, check=True).stdout)["checkpoints"]
    partial = [r for r in with_incomplete if r["gang"] and not r["gang"]["complete"]]
    assert sorted(r["metadata"]["step"] for r in partial) == [4, 5]
    assert all(r["gang"]["missing"] == [1] and r["state"] == "incomplete" for r in partial)
    shown = subprocess.run([*cli, "show", rows[0]["checkpoint_id"]], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert "3/3 parts committed, of a gang of 3 ranks" in shown, shown
    # Each rank's cards (one per attempt) have the gang's table, with each rank's part.
    pages = sorted(tmp_path.rglob("blank-checkpoint-*.html"))
    assert {p.parts[-3] for p in pages} == {"2", "2_node_1", "2_node_2"}, pages
    texts = [json.dumps(card_payload(p.read_text())) for p in pages]
    assert all("Gang checkpoints" in t for t in texts)
    # Each card reads the store as its rank ends, and the ranks end at different moments:
    # the last one of an attempt to end sees every rank's parts committed.
    assert any("| 3/3 | committed | committed | committed |" in t for t in texts)


@pytest.mark.flow
def test_ranks_that_committed_different_steps_resume_from_the_newest_common_one(
        run_flow: RunFlow) -> None:
    proc = run_flow("gang_flow.py", env=_gang_env("diverge"))
    out = proc.stdout + proc.stderr
    loaded = [v for v in _loaded(out).values() if v is not None]
    # Ranks 0 and 1 had committed step 4, rank 2 only step 2.
    assert sorted(loaded, key=lambda d: d["rank"]) == [
        {"rank": r, "step": 2} for r in range(3)], out


# In the slow tier: a replicated gang in a flow runs by default below (on a gang of another
# size), and which part each rank loads, in test_ranks_that_never_save_load_the_lowest_...
@pytest.mark.slow
@pytest.mark.flow
def test_where_only_rank_0_saves_every_rank_loads_its_latest(run_flow: RunFlow) -> None:
    proc = run_flow("gang_flow.py", env=_gang_env("replicated"))
    out = proc.stdout + proc.stderr
    loaded = _loaded(out)
    retried = [v for v in loaded.values() if v is not None]
    assert retried == [{"rank": 0, "step": 5}] * 3, out


@pytest.mark.flow
def test_saves_of_two_helper_processes_resume_from_the_newest(run_flow: RunFlow) -> None:
    proc = run_flow("helpers_flow.py")
    out = proc.stdout + proc.stderr
    r = results(out)
    # Helper 1 saved epochs 0-2, helper 2 epoch 3: the retry resumes from 3, and list()
    # is newest first.
    assert r["loaded"] == "3", out
    assert json.loads(r["listed"]) == [3, 2, 1, 0]


@pytest.mark.flow
def test_saves_of_helper_processes_are_pruned_by_keep_last(
        run_flow: RunFlow, datastore_root: Path) -> None:
    proc = run_flow("helpers_flow.py", env={"HELPERS_KEEP": "1"})
    out = proc.stdout + proc.stderr
    r = results(out)
    assert r["loaded"] == "3", out
    assert json.loads(r["listed"]) == [3]  # epochs 0-2 pruned in the first attempt
    # The retry's helper saved epoch 4; 3 stays as what the task resumed from.
    epochs = sorted(m.metadata["epoch"] for _, m in manifests(datastore_root))
    assert epochs == [3, 4], epochs


@pytest.mark.flow
def test_a_gang_of_another_size_is_refused_by_name(run_flow: RunFlow) -> None:
    # (How a gang of the same size resumes: test_a_sharded_gang_resumes_every_rank_from_...)
    run_flow("gang_eager_flow.py", env={**_gang_env(""), "GANG_SIZE": "3"})
    # Two ranks cannot take three shards: every rank refuses, naming both sizes.
    proc = run_flow("gang_eager_flow.py", env={**_gang_env(""), "GANG_SIZE": "2"},
                    check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "saved by a gang of 3 ranks, and this gang has 2" in out, out
    assert "load_policy='none'" in out


@pytest.mark.flow
def test_a_replicated_checkpoint_loads_on_a_gang_of_another_size(run_flow: RunFlow) -> None:
    env = {**_gang_env(""), "GANG_SHARDED": "0"}
    run_flow("gang_eager_flow.py", env={**env, "GANG_SIZE": "3"})
    proc = run_flow("gang_eager_flow.py", env={**env, "GANG_SIZE": "2"})
    r = _gang_results(proc.stdout + proc.stderr)
    # Only rank 0 saved: every rank of the new gang loads it.
    assert [r[f"loaded{i}"] for i in range(2)] == [{"rank": 0, "size": 3}] * 2
