"""Listing 1,000 committed checkpoints, and choosing one at task start, at 20 ms a request.

The in-memory endpoint (``memserver.py``) adds ``--delay-ms`` to every request, as S3 in
another building would. 1,000 checkpoints of one small file are committed in one scope;
then, timed:

- ``list()``: every committed checkpoint of the scope with its manifest
  (:meth:`Catalog.entries`, what ``current.checkpoint.list()`` and the card read);
- task start: the checkpoint to resume from (:meth:`Catalog.latest`, what the load
  policies call before the step runs);
- the baseline: the same listing with the manifests read one at a time, as before.

    python benchmarks/listing.py [--checkpoints 1000] [--delay-ms 20] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

from benchkit import BUCKET, SCOPE, request, s3_client, s3_engine
from benchrows import Row
from memserver import MemServer

from uploader.catalog import Catalog

GOAL_S = 1.0


def measure(checkpoints: int, delay_ms: float, repeat: int, *, tmpdir: str | None = None,
            log: Callable[[str], None] = print) -> list[Row]:
    med = statistics.median
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="listing-") as tmp, \
            MemServer(delay_ms=delay_ms) as srv:
        s3_client(srv.url).create_bucket(Bucket=BUCKET)
        staging = os.path.join(tmp, "staging")
        os.makedirs(staging)
        with open(os.path.join(staging, "step.json"), "w") as f:
            f.write('{"step": 0}')
        engine = s3_engine(srv.url, tmp, max_pending=64)
        try:
            t0 = time.perf_counter()
            handles = [engine.save(request(staging, metadata={"i": i}))
                       for i in range(checkpoints)]
            for h in handles:
                h.wait()
            log(f"  {checkpoints} checkpoints committed in {time.perf_counter() - t0:.1f} s "
                f"({delay_ms:g} ms per request)")
            catalog = Catalog(engine)
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
            keys = engine.list_manifest_keys(SCOPE.manifests_prefix())
            serial = [engine.read_manifest(k) for k in keys]
            serial_s = time.perf_counter() - t0
            assert len(serial) == checkpoints
        finally:
            engine.close()
    log(f"  list() {med(listed):.2f} s, task start {med(chosen):.2f} s, "
        f"serial reads {serial_s:.1f} s")
    common = dict(unit="s", baseline_name="serial manifest reads (once)", baseline=serial_s,
                  target=f"<= {GOAL_S:.0f} s")
    return [
        Row(f"list() with {checkpoints:,} checkpoints, {delay_ms:g} ms per request",
            med(listed), met=med(listed) <= GOAL_S, ratio=serial_s / med(listed),
            note="ratio = serial / ours", samples=listed, **common),  # type: ignore[arg-type]
        Row(f"choosing what to load at task start, {checkpoints:,} checkpoints",
            med(chosen), met=med(chosen) <= GOAL_S, ratio=serial_s / med(chosen),
            note="ratio = serial / ours", samples=chosen, **common),  # type: ignore[arg-type]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=1000)
    ap.add_argument("--delay-ms", type=float, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    for r in measure(args.checkpoints, args.delay_ms, args.repeat):
        print(f"{r.benchmark}: {r.value:.2f} s (serial {r.baseline:.1f} s; target {r.target})")


if __name__ == "__main__":
    main()
