"""Listing committed checkpoints, and choosing one at task start, at 20 ms a request.

The in-memory endpoint (``memserver.py``) adds ``--delay-ms`` to every request, as S3 in
another building would. For each count of ``--counts`` (10, 100, 1,000, 10,000),
checkpoints of one small file are committed in one scope; then, timed:

- engine-level ``list()``: every committed checkpoint of the scope with its manifest
  (:meth:`Catalog.entries`, what ``current.checkpoint.list()`` and the card read), by a
  reader that did not save them (a fresh engine on the same store: another process, a
  notebook), so every manifest is read;
- task start: the checkpoint to resume from (:meth:`Catalog.latest`, what the load
  policies call before the step runs), by the same fresh reader;
- task-level ``list()``: ``current.checkpoint.list()`` in a real task
  (``flows/listing_flow.py``, ``python flow.py run`` against the same kind of endpoint)
  that saved the checkpoints itself: the store's listing, and the manifests its engine
  committed taken from memory (:mod:`uploader.written`);
- the baseline: the same listing with the manifests read one at a time, as before.

    python benchmarks/listing.py [--counts 10,100,1000,10000] [--delay-ms 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchkit import BUCKET, CREDS, REGION, SCOPE, request, s3_client, s3_engine
from benchrows import Row
from memserver import MemServer

from uploader.catalog import Catalog

GOAL_S = 0.5  # for 1,000 checkpoints
FLOW = Path(__file__).resolve().parent / "flows" / "listing_flow.py"
_RESULT = re.compile(r"RESULT list_s=([\d.]+)")


def in_a_task(checkpoints: int, delay_ms: float, repeat: int) -> list[float]:
    """Seconds of each ``current.checkpoint.list()`` in a task that saved ``checkpoints``."""
    with tempfile.TemporaryDirectory(prefix="listing-task-") as tmp, \
            MemServer(delay_ms=delay_ms) as srv:
        s3_client(srv.url).create_bucket(Bucket=BUCKET)
        env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
        env.update({
            "METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DEFAULT_METADATA": "local",
            "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{BUCKET}/mf",
            "METAFLOW_DATASTORE_SYSROOT_LOCAL": tmp, "METAFLOW_S3_ENDPOINT_URL": srv.url,
            "AWS_ACCESS_KEY_ID": CREDS["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": CREDS["aws_secret_access_key"],
            "AWS_DEFAULT_REGION": REGION, "METAFLOW_CHECKPOINT_MAX_PENDING": "64",
            "USERNAME": os.environ.get("USERNAME", "bench"),
            "LISTING_CHECKPOINTS": str(checkpoints), "LISTING_REPEAT": str(repeat),
        })
        out = subprocess.run([sys.executable, str(FLOW), "--no-pylint", "run"], cwd=tmp,
                             env=env, capture_output=True, text=True, timeout=7200)
        if out.returncode != 0:
            raise SystemExit(out.stdout + out.stderr)
        return [float(m.group(1)) for line in (out.stdout + out.stderr).splitlines()
                if (m := _RESULT.search(line))]


def measure(checkpoints: int, delay_ms: float, repeat: int, *, tmpdir: str | None = None,
            log: Callable[[str], None] = print) -> list[Row]:
    med = statistics.median
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="listing-") as tmp, \
            MemServer(delay_ms=delay_ms) as srv:
        s3_client(srv.url).create_bucket(Bucket=BUCKET)
        staging = os.path.join(tmp, "staging")
        os.makedirs(staging)
        engine = s3_engine(srv.url, tmp, max_pending=64)
        try:
            t0 = time.perf_counter()
            handles = []
            for i in range(checkpoints):
                # New bytes each time, as in a training loop: an unchanged file would be
                # pointed at, and pointing saves wait for each other.
                with open(os.path.join(staging, "step.json"), "w") as f:
                    f.write(f'{{"step": {i}}}')
                handles.append(engine.save(request(staging, metadata={"i": i})))
            for h in handles:
                h.wait()
            log(f"  {checkpoints} checkpoints committed in {time.perf_counter() - t0:.1f} s "
                f"({delay_ms:g} ms per request)")
            # A reader that did not save them: every manifest is read from the store.
            reader = s3_engine(srv.url, tmp, name="reader")
            reader.read_objects([SCOPE.latest_key])  # its client is open, as in a task
            catalog = Catalog(reader)
            listed, chosen = [], []
            for _ in range(repeat):
                t0 = time.perf_counter()
                entries = catalog.entries(SCOPE.prefix)
                listed.append(time.perf_counter() - t0)
                assert len(entries) == checkpoints, len(entries)
                t0 = time.perf_counter()
                latest = catalog.latest(SCOPE.prefix)
                chosen.append(time.perf_counter() - t0)
                assert latest is not None and latest.manifest.metadata["i"] == checkpoints - 1
            t0 = time.perf_counter()
            keys = reader.list_manifest_keys(SCOPE.manifests_prefix())
            serial = [reader.read_manifest(k) for k in keys]
            serial_s = time.perf_counter() - t0
            assert len(serial) == checkpoints
            reader.close()
        finally:
            engine.close()
    task = in_a_task(checkpoints, delay_ms, repeat)
    log(f"  {checkpoints}: list() {med(listed):.2f} s (engine, fresh reader), "
        f"{med(task):.2f} s (in the task that saved them), task start {med(chosen):.2f} s, "
        f"serial reads {serial_s:.1f} s")
    judged = checkpoints == 1000
    goal = f"<= {GOAL_S:g} s" if judged else "reported (the target is for 1,000)"
    common = dict(unit="s", baseline_name="serial manifest reads (once)", baseline=serial_s,
                  target=goal, note="ratio = serial / ours", x=float(checkpoints))

    def met(v: float) -> bool | None:
        return v <= GOAL_S if judged else None

    return [
        Row(f"list() with {checkpoints:,} checkpoints, {delay_ms:g} ms per request, engine "
            "(a reader that did not save them)", med(listed), met=met(med(listed)),
            ratio=serial_s / med(listed), samples=listed, series="list(), engine",
            **common),  # type: ignore[arg-type]
        Row(f"list() with {checkpoints:,} checkpoints, {delay_ms:g} ms per request, in the "
            "task that saved them", med(task), met=met(med(task)),
            ratio=serial_s / med(task), samples=task, series="list(), in a task",
            **common),  # type: ignore[arg-type]
        Row(f"choosing what to load at task start, {checkpoints:,} checkpoints",
            med(chosen), met=met(med(chosen)), ratio=serial_s / med(chosen),
            samples=chosen, series="task start", **common),  # type: ignore[arg-type]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10,100,1000,10000")
    ap.add_argument("--delay-ms", type=float, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for n in (int(c) for c in args.counts.split(",")):
        for r in measure(n, args.delay_ms, args.repeat):
            print(f"{r.benchmark}: {r.value:.2f} s (serial {r.baseline:.1f} s; "
                  f"target {r.target})")


if __name__ == "__main__":
    main()
