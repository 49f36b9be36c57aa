"""The gang crash harness: one rank of a ``@parallel`` gang SIGKILLed in its save or upload.

``flows/gang_crash_flow.py`` trains 3 ranks in lock-step for a few steps, each rank
saving its own shard every step without waiting. In the first attempt one rank kills
itself (SIGKILL) at a seeded random point: mid-step before its save, as its save returns
with the upload in flight, from a thread a few ms into the save, or in the uploader just
before or after one of its writes to the store (the participant marker, a file, the
manifest that commits the part). Steps "train" for a random few tens of ms, so from none
to several saves are in flight at the kill; files are rewritten in place or replaced, and
snapshots hold them in memory or link them, at random. ``@retry`` runs the gang again,
and every rank reports what it loaded. Each trial checks that:

- the run succeeds, and every rank of the retry loaded the same step, or all loaded none;
- each rank loaded its own part of that step, byte for byte (every file, no other file);
- the step loaded is one all 3 ranks committed in the failed attempt, and no older than
  the newest such step committed before the retry started (a part a surviving rank
  commits after that may or may not be seen: the choice is written down once);
- rank 0's written choice names exactly the parts the ranks loaded;
- every part of every step in the store loads byte-exact.

Three fixed trials run by default (the last one kills a rank before its first save);
``pytest -m slow`` runs 30 seeded random ones, and ``-s`` prints a summary of where the
kills landed, what attempt 0 committed and what the retries loaded.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import random
import re
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RunFlow
from gangcrashkit import CHECKPOINT_NAME, expected, parse_loaded, tree_digests

from uploader import Engine, LocalBackend, Scope, Settings, TransferContext
from uploader.catalog import Catalog, Entry
from uploader.gang import Resume, decision_key

pytestmark = pytest.mark.flow

RANKS = 3
STEPS = 4
POINTS = ("before_save", "after_save", "during_save", "at_write")
# Edges of store writes: a save makes 5 writes (3 files, the manifest, the latest hint),
# and a rank's first save of an attempt one more before them (its participant marker).
TICKS = 12
SLOW_TRIALS = 30
SCOPE = Scope("GangCrashFlow", "user:tester", "train").prefix


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    rank: int
    step: int
    point: str
    delay_ms: float = 0.0  # during_save: when the thread kills the rank
    tick: int = 1  # at_write: the edge of a store write the rank dies at
    step_ms: float = 0.0  # how long each step trains
    inplace: bool = False  # files rewritten in place, rather than replaced
    linked: bool = False  # snapshots link files, rather than read them into memory

    def env(self) -> dict[str, str]:
        env = {"GANG_CRASH_RANK": str(self.rank), "GANG_CRASH_STEP": str(self.step),
               "GANG_CRASH_POINT": self.point, "GANG_CRASH_DELAY_MS": f"{self.delay_ms:.3f}",
               "GANG_CRASH_TICK": str(self.tick), "GANG_CRASH_STEP_MS": f"{self.step_ms:.3f}",
               "GANG_CRASH_INPLACE": "1" if self.inplace else "0",
               "GANG_CRASH_STEPS": str(STEPS)}
        if self.linked:
            env["METAFLOW_CHECKPOINT_COPY_BUDGET"] = "0"
        return env

    def __str__(self) -> str:
        where = {"during_save": f" +{self.delay_ms:.1f}ms",
                 "at_write": f" {'before' if self.tick % 2 else 'after'} write "
                             f"{(self.tick + 1) // 2}"}.get(self.point, "")
        return (f"{self.name}: kill rank {self.rank} at step {self.step} {self.point}{where} "
                f"({self.step_ms:.0f}ms steps, files {'in place' if self.inplace else 'replaced'}"
                f", {'linked' if self.linked else 'in memory'})")


def seeded(i: int) -> Trial:
    """Trial ``i`` of the slow tier. The kill point and the step cycle, so that 16
    trials cover every pair of them (the first step, where ranks declare themselves, as
    much as the others); the rest is drawn from a generator seeded by ``i``."""
    rng = random.Random(f"gang-crash-{i}")
    step = (i // len(POINTS)) % STEPS
    # The last step's writes are its own 5; an edge past them would never come.
    edges = TICKS if step == 0 else 10
    return Trial(name=f"seed{i:02d}", rank=rng.randrange(RANKS), step=step,
                 point=POINTS[i % len(POINTS)], delay_ms=rng.uniform(0.0, 30.0),
                 tick=rng.randint(1, edges), step_ms=rng.uniform(0.0, 100.0),
                 inplace=rng.random() < 0.5, linked=rng.random() < 0.5)


QUICK = [
    # A worker dies as its step-2 save returns, with the upload in flight.
    Trial("quick-worker", rank=2, step=2, point="after_save", step_ms=20),
    # Rank 0 (the control task) dies in its uploader, around the writes of its step-1
    # files, before the manifest that would commit its part.
    Trial("quick-control", rank=0, step=1, point="at_write", tick=6, step_ms=60,
          inplace=True, linked=True),
]


@dataclasses.dataclass
class Outcome:
    trial: Trial
    loaded: int | None  # the step every rank loaded; None: nothing
    newest_before_retry: int | None  # newest step all ranks had committed as it started
    newest_at_end: int | None  # the same, once every rank of attempt 0 had exited
    committed: str  # attempt 0's committed parts: "<step>:<ranks>" per step
    seconds: float

    def __str__(self) -> str:
        late = ("" if self.newest_at_end == self.newest_before_retry
                else f", step {self.newest_at_end} completed later")
        return (f"{self.trial} -> loaded {_step(self.loaded)} (newest complete "
                f"{_step(self.newest_before_retry)}{late}; parts {self.committed or '-'}), "
                f"{self.seconds:.1f}s")


def _step(s: int | None) -> str:
    return "none" if s is None else str(s)


OUTCOMES: list[Outcome] = []
FAILURES: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    started = time.monotonic()
    yield
    if not OUTCOMES and not FAILURES:
        return
    lines = [f"\ngang crash harness: {len(OUTCOMES) + len(FAILURES)} trial(s), "
             f"{len(OUTCOMES)} passed, {len(FAILURES)} failed, "
             f"{time.monotonic() - started:.0f}s"]
    lines += [f"  {o}" for o in OUTCOMES]
    lines += [f"  FAILED {f}" for f in FAILURES]
    loaded = collections.Counter(_step(o.loaded) for o in OUTCOMES)
    lines.append("  loaded step: " + ", ".join(f"{k}: {v}" for k, v in sorted(loaded.items())))
    points = collections.Counter(o.trial.point for o in OUTCOMES)
    lines.append("  kill points: " + ", ".join(f"{k}: {v}" for k, v in sorted(points.items())))
    ranks = collections.Counter(o.trial.rank for o in OUTCOMES)
    lines.append("  killed rank: " + ", ".join(f"{k}: {v}" for k, v in sorted(ranks.items())))
    late = sum(o.newest_at_end != o.newest_before_retry for o in OUTCOMES)
    lines.append(f"  a step completed by a surviving rank after the retry started: {late}")
    print("\n".join(lines))


def reader(datastore_root: Path, tmp: Path) -> Engine:
    """An engine on the store the flow's tasks wrote."""

    def factory(ctx: TransferContext) -> LocalBackend:
        return LocalBackend(str(datastore_root), ctx)

    return Engine(factory, Settings(), snapshot_dir=str(tmp / "reader-snapshots"),
                  log=lambda m: None)


def retry_started(text: str) -> float:
    """When the runtime started the retry of the gang's control task (epoch seconds)."""
    m = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \[[^\]]*/train/[^\]]*\] "
                  r"Task is starting \(retry\)", text, re.M)
    assert m, "the gang was not retried"
    return datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").timestamp()


def check_store(engine: Engine, datastore_root: Path, tmp: Path, *, since: float
                ) -> tuple[dict[int, dict[int, Entry]], str, str, set[int]]:
    """Every committed part, of both attempts, loads byte-exact as its rank's shard of
    its step. Returns attempt 0's parts (step -> rank -> entry), the run and gang ids,
    and the steps all ranks had committed before ``since``."""
    catalog = Catalog(engine)
    entries = catalog.entries(SCOPE, incomplete=True)
    assert entries, "nothing was committed"
    runs = {e.keys.run_id for e in entries}
    assert len(runs) == 1, runs
    gangs = {e.gang.gang_id for e in entries if e.gang is not None}
    assert len(gangs) == 1 and all(e.gang is not None for e in entries), entries
    attempt0: dict[int, dict[int, Entry]] = {}
    committed_by: dict[int, dict[int, float]] = {}
    for e in entries:
        assert e.gang is not None
        attempt, name, k = e.gang.step.split("/")
        assert name == CHECKPOINT_NAME
        for rank, part in e.gang.parts.items():
            meta = part.manifest.metadata
            assert meta["rank"] == rank, (part.keys.manifest, meta)
            if attempt == "0":
                # Lock-step from step 0: the k-th save of attempt 0 is training step k.
                assert meta["step"] == int(k), (part.keys.manifest, meta)
                attempt0.setdefault(int(k), {})[rank] = part
                # A manifest is committed by a rename, which sets its ctime.
                ctime = os.stat(datastore_root / part.keys.manifest).st_ctime_ns / 1e9
                committed_by.setdefault(int(k), {})[rank] = ctime
            out = tmp / f"part-{uuid.uuid4().hex[:8]}"
            catalog.load(part, str(out))
            assert tree_digests(str(out)) == expected(rank, meta["step"]), part.keys.manifest
    complete_early = {k for k, by_rank in committed_by.items()
                      if len(by_rank) == RANKS and max(by_rank.values()) < since}
    return attempt0, runs.pop(), gangs.pop(), complete_early


def run_trial(trial: Trial, run_flow: RunFlow, tmp_path: Path, datastore_root: Path
              ) -> Outcome:
    started = time.monotonic()
    env = {**trial.env(), "GANG_CRASH_BARRIER": str(tmp_path / "barrier"),
           # Local @parallel starts the other ranks with the `python` on PATH.
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           # A rank waiting for rank 0's choice gives up in a minute, not 15.
           "METAFLOW_CHECKPOINT_GANG_TIMEOUT": "60"}
    proc = run_flow("gang_crash_flow.py", env=env, check=False, timeout=240)
    text = proc.stdout + proc.stderr
    seconds = time.monotonic() - started

    def context() -> str:
        keep = [line for line in text.splitlines()
                if re.search(r"LOADED|TRAINED|\[@checkpoint\]|Task (is starting|failed|fini)"
                             r"|died|broke|rror", line)]
        return f"{trial} (exit {proc.returncode})\n" + "\n".join(keep[-80:])

    loaded = parse_loaded(proc.stdout)
    assert sorted(loaded) == list(range(RANKS)), f"not every rank reported a load:\n{context()}"
    steps = {r: v["step"] for r, v in loaded.items()}
    assert len(set(steps.values())) == 1, f"the ranks loaded different steps {steps}:\n{context()}"
    step = steps[0]
    assert isinstance(step, int | type(None))
    for r, v in loaded.items():
        if step is None:
            assert v["files"] == {}, f"rank {r} loaded nothing, yet has files:\n{context()}"
            continue
        assert v["owner"] == r, (f"rank {r} loaded rank {v['owner']}'s part of step {step}, "
                                 f"not its own:\n{context()}")
        assert v["files"] == expected(r, step), (
            f"rank {r}'s files after loading step {step} are not its shard of that step, "
            f"byte for byte:\n{context()}")
    assert proc.returncode == 0, f"the run failed:\n{context()}"
    assert len(re.findall(r"TRAINED rank=\d attempt=1", text)) == RANKS, context()

    engine = reader(datastore_root, tmp_path)
    try:
        since = retry_started(text)
        attempt0, run_id, gang_id, early = check_store(engine, datastore_root, tmp_path,
                                                       since=since)
        complete = {k for k, by_rank in attempt0.items() if len(by_rank) == RANKS}
        newest_early = max(early, default=None)
        newest_end = max(complete, default=None)
        if step is not None:
            assert step in complete, (
                f"step {step} was loaded, but only ranks {sorted(attempt0.get(step, {}))} "
                f"committed it in attempt 0:\n{context()}")
            for r, v in loaded.items():
                assert v["key"] == attempt0[step][r].keys.manifest, context()
        assert newest_early is None or (step is not None and step >= newest_early), (
            f"loaded step {_step(step)}, while all ranks had committed step {newest_early} "
            f"before the retry started:\n{context()}")
        raw = engine.run(engine.backend.get_bytes, decision_key(SCOPE, run_id, gang_id, 1))
        assert raw is not None, "rank 0 wrote no choice"
        choice = Resume.from_json(raw)
        assert not choice.error, choice.error
        assert {r: choice.key_for(r) for r in range(RANKS)} == {
            r: v["key"] if step is not None else None for r, v in loaded.items()}, context()
    finally:
        engine.close()
    committed = " ".join(f"{k}:{''.join(str(r) for r in sorted(by_rank))}"
                         for k, by_rank in sorted(attempt0.items()))
    return Outcome(trial, step, newest_early, newest_end, committed, seconds)


def check(trial: Trial, run_flow: RunFlow, tmp_path: Path, datastore_root: Path) -> None:
    try:
        OUTCOMES.append(run_trial(trial, run_flow, tmp_path, datastore_root))
    except BaseException as e:
        FAILURES.append(f"{trial}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        raise


@pytest.mark.parametrize("trial", QUICK, ids=[t.name for t in QUICK])
def test_a_killed_rank_leaves_every_rank_resuming_from_one_whole_step(
        trial: Trial, run_flow: RunFlow, tmp_path: Path, datastore_root: Path) -> None:
    check(trial, run_flow, tmp_path, datastore_root)


SLOW = [seeded(i) for i in range(SLOW_TRIALS)]


@pytest.mark.slow
@pytest.mark.parametrize("trial", SLOW, ids=[t.name for t in SLOW])
def test_thirty_random_rank_kills(trial: Trial, run_flow: RunFlow, tmp_path: Path,
                                  datastore_root: Path) -> None:
    check(trial, run_flow, tmp_path, datastore_root)


# A rank that dies before its first save of an attempt could declare it a participant
# looks like a rank that never saves: the others' first step must not be taken for a
# complete gang checkpoint, or that rank would be given another rank's shard as its own.
FIRST_SAVE = Trial("first-save", rank=2, step=0, point="before_save", step_ms=20)


def test_a_rank_killed_before_its_first_save_loads_no_other_rank_s_part(
        run_flow: RunFlow, tmp_path: Path, datastore_root: Path) -> None:
    check(FIRST_SAVE, run_flow, tmp_path, datastore_root)
