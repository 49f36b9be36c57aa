"""The crash harness: a checkpoint upload SIGKILLed at seeded random points.

A child process (``crashkit.py``) saves multi-file checkpoints with multipart files, one
after another, and is killed either at a chosen operation (before or after a backend
request, a rename, an fsync) or after a chosen delay (anywhere, mid-request included).
After each kill a new process, as a new attempt would, checks the store:

- every checkpoint any reader can see is complete: each file there, byte for byte;
- every save the child was told is durable is there;
- the newest committed one is what "latest" picks, and it loads, verified.

A few trials per backend (local, S3 on moto) run by default; ``pytest -m slow`` runs 30
per backend, and Azure's (on Azurite) and GCS's (on its emulator) too.

On S3 a second harness kills the child's upload worker process instead, one to four times
at seeded points (operations or moments), and lets the child go on: every save must still
commit (on a new worker, or in threads after repeated deaths), and everything committed
must load byte for byte.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from crashkit import SCOPE_ARGS, expected
from treekit import fresh_bucket, local_engine, read_tree, s3_engine

from uploader import Engine, Scope
from uploader.catalog import Catalog

HERE = Path(__file__).parent
SAVES = 3
SLOW_TRIALS = 30
QUICK_TRIALS = 3
QUICK_WORKER_TRIALS = 2


@dataclass
class Tally:
    trials: int = 0
    killed: int = 0
    by_op: int = 0
    by_time: int = 0
    committed_seen: list[int] = field(default_factory=list)  # checkpoints visible per trial


def run_child(cfg: dict[str, Any], *, kill_after: float | None = None
              ) -> tuple[int, list[str], float]:
    """Run the child; return its exit code, its lines, and its seconds after READY."""
    proc = subprocess.Popen([sys.executable, str(HERE / "crashkit.py"), json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    try:
        first = proc.stdout.readline()
        ready = time.monotonic()
        lines.append(first.strip())
        if kill_after is not None and first.strip() == "READY":
            # The kill point: a seeded delay into the run, not a wait for anything.
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
        ran_s = time.monotonic() - ready
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    lines += [line.strip() for line in out.splitlines()]
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed ({proc.returncode}):\n{out}\n{err}")
    return proc.returncode, lines, ran_s


def check_store(engine: Engine, tmp: Path, claimed: set[int]) -> int:
    """Everything a reader can see is whole; what was claimed durable is there."""
    catalog = Catalog(engine)
    scope = Scope(*SCOPE_ARGS).prefix
    entries = catalog.entries(scope)
    seen = {int(e.manifest.metadata["i"]) for e in entries}
    assert claimed <= seen, (claimed, seen)
    for n, e in enumerate(entries):
        out = tmp / f"check-{uuid.uuid4().hex[:8]}-{n}"
        catalog.load(e, str(out))
        assert read_tree(out) == expected(int(e.manifest.metadata["i"])), e.keys
    if entries:
        # A new attempt resumes from the newest committed save, and it loads verified.
        latest = catalog.latest(scope)
        assert latest is not None and int(latest.manifest.metadata["i"]) == max(seen)
    return len(entries)


def _setup(kind: str, tmp: Path, name: str, s3_server: Any) -> tuple[dict[str, Any], Path]:
    """``s3_server``: the moto server for "s3", the store's kit (storekits.py) for "azure"
    and "gcs"."""
    where = tmp / name
    where.mkdir()
    cfg: dict[str, Any] = {"kind": kind, "tmp": str(where), "saves": SAVES, "run_id": name}
    if kind == "s3":
        cfg.update(endpoint=s3_server.endpoint, bucket=fresh_bucket(s3_server))
    elif kind == "azure":
        handle = s3_server.fresh(name)
        cfg.update(account_url=handle.azurite.account_url, container=handle.container,
                   ca_bundle=handle.azurite.ca_bundle)
    elif kind == "gcs":
        handle = s3_server.fresh(name)
        cfg.update(endpoint=handle.server.endpoint, bucket=handle.bucket)
    return cfg, where


def _reader(kind: str, cfg: dict[str, Any], where: Path, s3_server: Any) -> Engine:
    if kind == "local":
        return local_engine(where)  # the same store the child wrote
    if kind == "azure":
        from crashkit import azure_engine

        return azure_engine(cfg, where / "reader")
    if kind == "gcs":
        from crashkit import gcs_engine

        return gcs_engine(cfg, where / "reader")
    return s3_engine(s3_server, where / "reader", cfg["bucket"])


def _calibrate(kind: str, tmp: Path, s3_server: Any) -> tuple[int, float]:
    """One run without a kill: how many operations and how long a whole run takes."""
    cfg, _ = _setup(kind, tmp, "calibrate", s3_server)
    code, lines, whole_s = run_child(cfg)
    assert code == 0 and "DONE" in lines, lines
    return int(next(line.split()[1] for line in lines if line.startswith("OPS"))), whole_s


def harness(kind: str, trials: int, tmp: Path, s3_server: Any = None) -> Tally:
    def setup(name: str) -> tuple[dict[str, Any], Path]:
        return _setup(kind, tmp, name, s3_server)

    def reader(cfg: dict[str, Any], where: Path) -> Engine:
        return _reader(kind, cfg, where, s3_server)

    ops, whole_s = _calibrate(kind, tmp, s3_server)
    tally = Tally()
    for trial in range(trials):
        rng = random.Random(f"{kind}-{trial}")
        cfg, where = setup(f"t{trial}")
        if rng.random() < 0.5:
            cfg["kill_op"] = rng.randint(1, ops)
            code, lines, _ = run_child(cfg)
            tally.by_op += 1
        else:
            code, lines, _ = run_child(cfg, kill_after=rng.uniform(0.0, whole_s))
            tally.by_time += 1
        tally.trials += 1
        tally.killed += code == -signal.SIGKILL
        claimed = {int(line.split()[1]) for line in lines if line.startswith("COMMITTED")}
        engine = reader(cfg, where)
        try:
            tally.committed_seen.append(check_store(engine, where, claimed))
        finally:
            engine.close()
    print(f"\n{kind}: {tally}")
    return tally


def assert_meaningful(tally: Tally, trials: int) -> None:
    assert tally.trials == trials
    # The kill points are spread over the run: most trials kill it, and at least one
    # trial leaves some checkpoint committed and one leaves fewer than all.
    assert tally.killed >= trials // 2
    if trials >= 10:
        assert any(n > 0 for n in tally.committed_seen)
        assert any(n < SAVES for n in tally.committed_seen)


@dataclass
class WorkerTally:
    trials: int = 0
    by_op: int = 0
    by_time: int = 0
    kills: int = 0  # worker processes killed
    mid_request: int = 0  # of those, killed while holding requests
    fell_back: int = 0  # trials whose uploads ended in threads


def worker_harness(trials: int, tmp: Path, s3_server: Any) -> WorkerTally:
    ops, whole_s = _calibrate("s3", tmp, s3_server)
    tally = WorkerTally()
    for trial in range(trials):
        rng = random.Random(f"worker-{trial}")
        cfg, where = _setup("s3", tmp, f"w{trial}", s3_server)
        cfg["max_attempts"] = 8  # the default policy: three deaths never spend it
        kills = rng.randint(1, 4)
        if rng.random() < 0.5:
            cfg["kill_worker_ops"] = sorted(rng.sample(range(1, ops + 1), min(kills, ops)))
            tally.by_op += 1
        else:
            cfg["kill_worker_after"] = sorted(rng.uniform(0.0, whole_s) for _ in range(kills))
            tally.by_time += 1
        code, lines, _ = run_child(cfg)
        # Killing the worker never kills the task, and every save still commits.
        assert code == 0 and "DONE" in lines, (cfg, lines)
        claimed = {int(line.split()[1]) for line in lines if line.startswith("COMMITTED")}
        assert claimed == set(range(SAVES)), (cfg, lines)
        killed = [line.split() for line in lines
                  if line.startswith("WORKER_KILLED") and line != "WORKER_KILLED none"]
        tally.trials += 1
        tally.kills += len(killed)
        tally.mid_request += sum(int(k[2]) > 0 for k in killed)
        tally.fell_back += "PLANE threads" in lines
        engine = _reader("s3", cfg, where, s3_server)
        try:
            assert check_store(engine, where, claimed) == SAVES
        finally:
            engine.close()
    print(f"\nworker kills: {tally}")
    return tally


def assert_worker_kills_meaningful(tally: WorkerTally, trials: int) -> None:
    assert tally.trials == trials
    assert tally.kills >= 1 and tally.mid_request >= 1
    if trials >= 10:
        assert tally.kills >= trials
        assert tally.mid_request >= trials // 3
        assert tally.fell_back >= 1


def test_crashes_never_expose_incomplete_checkpoints_locally(tmp_path: Path) -> None:
    assert_meaningful(harness("local", QUICK_TRIALS, tmp_path), QUICK_TRIALS)


@pytest.mark.s3
@pytest.mark.slow
def test_crashes_never_expose_incomplete_checkpoints_on_s3(s3_server: Any,
                                                           tmp_path: Path) -> None:
    assert_meaningful(harness("s3", QUICK_TRIALS, tmp_path, s3_server), QUICK_TRIALS)


@pytest.mark.slow  # a minute and more: Azurite answers slower than moto
@pytest.mark.azure
def test_crashes_never_expose_incomplete_checkpoints_on_azure(store_kits: Any,
                                                              tmp_path: Path) -> None:
    kit = store_kits.get("azure")
    assert_meaningful(harness("azure", QUICK_TRIALS, tmp_path, kit), QUICK_TRIALS)


@pytest.mark.slow
@pytest.mark.azure
def test_thirty_crashes_on_azure(store_kits: Any, tmp_path: Path) -> None:
    kit = store_kits.get("azure")
    assert_meaningful(harness("azure", SLOW_TRIALS, tmp_path, kit), SLOW_TRIALS)


@pytest.mark.slow
@pytest.mark.gcs
def test_thirty_crashes_on_gcs(store_kits: Any, tmp_path: Path) -> None:
    kit = store_kits.get("gcs")
    assert_meaningful(harness("gcs", SLOW_TRIALS, tmp_path, kit), SLOW_TRIALS)


@pytest.mark.slow
def test_thirty_crashes_locally(tmp_path: Path) -> None:
    assert_meaningful(harness("local", SLOW_TRIALS, tmp_path), SLOW_TRIALS)


@pytest.mark.slow
@pytest.mark.s3
def test_thirty_crashes_on_s3(s3_server: Any, tmp_path: Path) -> None:
    assert_meaningful(harness("s3", SLOW_TRIALS, tmp_path, s3_server), SLOW_TRIALS)


@pytest.mark.s3
@pytest.mark.slow
def test_worker_kills_never_lose_a_save(s3_server: Any, tmp_path: Path) -> None:
    assert_worker_kills_meaningful(worker_harness(QUICK_WORKER_TRIALS, tmp_path, s3_server),
                                   QUICK_WORKER_TRIALS)


@pytest.mark.slow
@pytest.mark.s3
def test_thirty_worker_kills_on_s3(s3_server: Any, tmp_path: Path) -> None:
    assert_worker_kills_meaningful(worker_harness(SLOW_TRIALS, tmp_path, s3_server),
                                   SLOW_TRIALS)
