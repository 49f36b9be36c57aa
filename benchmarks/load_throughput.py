"""Loading a 1 GiB checkpoint from S3, against boto3's ``download_file`` of the same object.

The checkpoint is saved once to the in-memory endpoint (``memserver.py``, so the server's
own work does not set the pace). Ours: ``Engine.load`` (concurrent ranged GETs written with
``pwrite``, the file's SHA-256 verified, the file placed only once complete). boto3:
``download_file`` with a ``TransferConfig`` of the same concurrency and part size (it does
not verify a checksum). Interleaved rounds; outputs are deleted and synced between them.

    python benchmarks/load_throughput.py [--size 1GiB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

from benchfiles import make_file
from benchkit import BUCKET, SCOPE, committed, request, s3_client, s3_engine
from benchrows import Row
from boto3.s3.transfer import TransferConfig
from memserver import MemServer

from uploader.catalog import Catalog
from uploader.config import MiB, parse_size

GOAL = 1.0


def measure(size: int, repeat: int, *, concurrency: int = 16, part_size: int = 16 * MiB,
            tmpdir: str | None = None, log: Callable[[str], None] = print) -> list[Row]:
    med = statistics.median
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="load-") as tmp, MemServer() as srv:
        client = s3_client(srv.url, max_pool_connections=concurrency)
        client.create_bucket(Bucket=BUCKET)
        staging = os.path.join(tmp, "staging")
        os.makedirs(staging)
        make_file(os.path.join(staging, "model.bin"), size)
        engine = s3_engine(srv.url, tmp, upload_concurrency=concurrency, part_size=part_size)
        cfg = TransferConfig(multipart_threshold=max(32 * MiB, part_size),
                             multipart_chunksize=part_size, max_concurrency=concurrency,
                             preferred_transfer_client="classic")
        try:
            committed(engine.save(request(staging)))
            entry = Catalog(engine).entries(SCOPE.prefix)[0]
            key = f"ours/{entry.keys.data('model.bin')}"
            ours, base = [], []
            for i in range(repeat + 1):  # the first round warms both up, untimed
                out = os.path.join(tmp, f"out-{i}")
                t0 = time.perf_counter()
                Catalog(engine).load(entry, out)
                t_ours = time.perf_counter() - t0
                assert os.path.getsize(os.path.join(out, "model.bin")) == size
                shutil.rmtree(out)
                os.sync()
                dest = os.path.join(tmp, f"boto3-{i}.bin")
                t0 = time.perf_counter()
                client.download_file(BUCKET, key, dest, Config=cfg)
                t_base = time.perf_counter() - t0
                assert os.path.getsize(dest) == size
                os.unlink(dest)
                os.sync()
                if i:
                    ours.append(size / t_ours / 1e6)
                    base.append(size / t_base / 1e6)
                    log(f"  round {i}: ours {ours[-1]:.0f} MB/s, download_file {base[-1]:.0f} MB/s")
        finally:
            engine.close()
    ratio = med(ours) / med(base)
    return [Row(f"load of a {size / (1 << 30):g} GiB checkpoint", med(ours), "MB/s",
                "boto3 download_file", med(base), f">= {GOAL:.1f}x", ratio >= GOAL, ratio,
                note="ours verifies the SHA-256; in-memory endpoint",
                samples=ours, baseline_samples=base)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    for r in measure(parse_size(args.size), args.repeat, tmpdir=args.dir):
        print(f"{r.benchmark}: {r.value:.0f} MB/s vs {r.baseline:.0f} MB/s ({r.ratio:.2f}x)")


if __name__ == "__main__":
    main()
