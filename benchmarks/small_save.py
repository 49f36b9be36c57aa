"""A 1 KB checkpoint on S3: from save() to committed, against one boto3 put_object.

Ours writes the data object, then the manifest (the commit point); the ``latest.json`` hint
follows the commit and is not waited for. The baseline is boto3's ``put_object`` of the
same file on an already-open client. Both against the same endpoint, in the same run,
interleaved. The published ``metaflow-checkpoint`` package takes 1-3 s for this.

    python benchmarks/small_save.py [--repeat 20] [--server memory|localbucket]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

from benchkit import BUCKET, committed, request, s3_client, s3_engine
from benchrows import Row
from memserver import MemServer

from uploader.config import UploaderMode


def measure(repeat: int, modes: list[str], *, tmpdir: str | None = None,
            log: Callable[[str], None] = print) -> list[Row]:
    med = statistics.median
    rows = []
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="small-save-") as tmp, \
            MemServer() as srv:
        client = s3_client(srv.url)
        client.create_bucket(Bucket=BUCKET)
        staging = os.path.join(tmp, "staging")
        os.makedirs(staging)
        path = os.path.join(staging, "metrics.json")
        with open(path, "wb") as f:
            f.write(os.urandom(1000))
        # The same file every time: measure its upload, not finding it unchanged.
        engines = {m: s3_engine(srv.url, tmp, name=m, uploader=UploaderMode(m),
                                incremental=False) for m in modes}
        try:
            for e in engines.values():
                committed(e.save(request(staging)))  # warm: clients, worker, pools
            client.put_object(Bucket=BUCKET, Key="warm", Body=b"x")
            ours: dict[str, list[float]] = {m: [] for m in modes}
            base = []
            for i in range(repeat):
                for m, e in engines.items():
                    t0 = time.perf_counter()
                    committed(e.save(request(staging)))
                    ours[m].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                with open(path, "rb") as f:
                    client.put_object(Bucket=BUCKET, Key=f"boto3/{i}/metrics.json", Body=f)
                base.append(time.perf_counter() - t0)
        finally:
            for e in engines.values():
                e.close()
    for m in modes:
        log(f"  1 KB save() to committed ({m}): {med(ours[m]) * 1e3:.1f} ms; "
            f"boto3 put_object {med(base) * 1e3:.1f} ms")
        rows.append(Row(
            f"1 KB save on S3, save() to committed ({m})", med(ours[m]) * 1e3, "ms",
            "boto3 put_object", med(base) * 1e3, "report (metaflow-checkpoint: 1-3 s)", None,
            med(ours[m]) / med(base), note="ratio = ours / put_object; two PUTs in ours",
            samples=[x * 1e3 for x in ours[m]], baseline_samples=[x * 1e3 for x in base]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--modes", default="process,thread")
    args = ap.parse_args()
    for r in measure(args.repeat, args.modes.split(",")):
        print(f"{r.benchmark}: {r.value:.1f} ms vs {r.baseline:.1f} ms ({r.ratio:.1f}x)")


if __name__ == "__main__":
    main()
