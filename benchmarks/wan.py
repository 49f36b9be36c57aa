"""Upload and load over a WAN profile: one large checkpoint and many small files.

The in-memory endpoint (``memserver.py``) runs with a WAN profile: every request waits
``--delay-ms`` (30 ms) before its response starts, and every connection moves its bodies
at no more than ``--bandwidth-mbps`` (100 MB/s) in each direction, as one connection to S3
in another place does. There part size and concurrency decide the result, not the
client's CPU alone. Each contender runs with its own defaults, as a user would run it:

* ours: an ``Engine`` with an ``S3Backend`` and default ``Settings`` (upload timed from
  ``save()`` to committed; load is ``Catalog.load`` into an empty directory, every file's
  SHA-256 verified). Every round saves new bytes (fresh random contents), so incremental
  uploads upload, not skip.
* boto3: ``upload_file``/``download_file`` with the default ``TransferConfig`` (8 MiB
  parts, 10 threads). Small files also as a user would write it: a loop of
  ``upload_file``/``download_file`` calls (timed over the first ``--loop-sample`` files:
  a loop's rate does not change with the count, and all of them would take minutes), and
  the same calls in a ``ThreadPoolExecutor`` of 32 threads (a client with 32 connections),
  timed over the first 2,000 (its rate is steady once every thread is busy).
* s5cmd: ``s5cmd cp`` of the file or of the directory (``'prefix/*'`` to load), with its
  defaults (256 workers, 5 parts of 50 MiB in flight per file).

Rounds rotate the order; figures are medians; ours over each baseline is the ratio.

    python benchmarks/wan.py [--size 1GiB] [--files 10000] [--file-size 4KiB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchkit import (  # noqa: E402
    BUCKET,
    CREDS,
    REGION,
    SCOPE,
    committed,
    request,
    s3_client,
    s3_engine,
)
from benchrows import Row  # noqa: E402
from memserver import WAN_BANDWIDTH_MBPS, WAN_DELAY_MS, MemServer  # noqa: E402

from uploader import Settings  # noqa: E402
from uploader.catalog import Catalog  # noqa: E402
from uploader.config import MiB, parse_size  # noqa: E402

GiB = 1 << 30
POOL_THREADS = 32
POOL_SAMPLE = 2000  # files the pool is timed over: its rate is steady once 32 are busy
BIG_VS_BOTO3, BIG_VS_S5CMD, SMALL_VS_S5CMD = 1.0, 0.9, 1.0


def find_s5cmd() -> str:
    from upload_throughput import find_s5cmd as find

    return find()


def fresh_file(path: str, size: int, rng: random.Random) -> None:
    """``size`` new random bytes at ``path`` (a new inode: no snapshot of an earlier round
    shares it), every 16 MiB different, so nothing can be skipped as already stored."""
    with open(path + ".new", "wb") as f:
        left = size
        while left > 0:
            n = min(left, 16 * MiB)
            f.write(rng.randbytes(n))
            left -= n
    os.replace(path + ".new", path)


def fresh_tree(root: str, count: int, size: int, rng: random.Random) -> list[str]:
    """``count`` files of ``size`` new random bytes under ``root`` (100 to a directory)."""
    shutil.rmtree(root, ignore_errors=True)
    names = []
    for i in range(count):
        name = f"d{i // 100:03d}/f{i:05d}.bin"
        path = os.path.join(root, name)
        if i % 100 == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(rng.randbytes(size))
        names.append(name)
    return names


class Wan:
    def __init__(self, srv: MemServer, tmp: str, log: Callable[[str], None],
                 **settings: Any) -> None:
        self.srv, self.tmp, self.log = srv, tmp, log
        self.client = s3_client(srv.url)  # boto3's defaults: 10 connections
        self.pool_client = s3_client(srv.url, max_pool_connections=POOL_THREADS)
        self.client.create_bucket(Bucket=BUCKET)
        self.engine = s3_engine(srv.url, tmp, name="wan", **settings)
        self.settings = Settings(**settings)
        self.s5cmd = find_s5cmd()
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID=CREDS["aws_access_key_id"],
                        AWS_SECRET_ACCESS_KEY=CREDS["aws_secret_access_key"],
                        AWS_REGION=REGION)
        self.rng = random.Random(0)

    def close(self) -> None:
        self.engine.close()

    def s5(self, *args: str) -> None:
        cmd = [self.s5cmd, "--endpoint-url", self.srv.url, "--log", "error", *args]
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"s5cmd failed ({done.returncode}): {' '.join(cmd)}\n"
                               f"{done.stdout}{done.stderr}")

    def clean(self, *paths: str) -> None:
        """Remove ``paths`` and every object: the endpoint drops its buckets at once (one
        DELETE per object would cost a round trip each), and the bucket is made again."""
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
        urllib.request.urlopen(urllib.request.Request(f"{self.srv.url}/moto-api/reset",
                                                      method="POST")).read()
        self.client.create_bucket(Bucket=BUCKET)

    # -- ours

    def ours_save(self, source: str) -> tuple[float, Any]:
        t0 = time.perf_counter()
        handle = self.engine.save(request(source))
        committed(handle)
        return time.perf_counter() - t0, handle

    def ours_load(self, dest: str) -> float:
        entry = Catalog(self.engine).entries(SCOPE.prefix)[0]
        t0 = time.perf_counter()
        Catalog(self.engine).load(entry, dest)
        return time.perf_counter() - t0

    # -- one large file

    def big_round(self, size: int, order: list[str]) -> dict[str, tuple[float, float]]:
        """Seconds to upload and to load ``size`` bytes, per contender."""
        staging = os.path.join(self.tmp, "big")
        os.makedirs(staging, exist_ok=True)
        src = os.path.join(staging, "model.bin")
        fresh_file(src, size, self.rng)
        out: dict[str, tuple[float, float]] = {}
        for name in order:
            dest = os.path.join(self.tmp, "big-out")
            os.makedirs(dest, exist_ok=True)
            target = os.path.join(dest, "model.bin")
            if name == "ours":
                up, _ = self.ours_save(staging)
                shutil.rmtree(dest)
                down = self.ours_load(dest)
            elif name == "boto3":
                key = f"boto3/{secrets.token_hex(4)}/model.bin"
                t0 = time.perf_counter()
                self.client.upload_file(src, BUCKET, key)
                up = time.perf_counter() - t0
                t0 = time.perf_counter()
                self.client.download_file(BUCKET, key, target)
                down = time.perf_counter() - t0
            else:
                key = f"s5cmd/{secrets.token_hex(4)}/model.bin"
                t0 = time.perf_counter()
                self.s5("cp", src, f"s3://{BUCKET}/{key}")
                up = time.perf_counter() - t0
                t0 = time.perf_counter()
                self.s5("cp", f"s3://{BUCKET}/{key}", target)
                down = time.perf_counter() - t0
            got = os.path.getsize(target)
            if got != size:
                raise RuntimeError(f"{name}: loaded {got} bytes, expected {size}")
            self.clean(dest)
            out[name] = (up, down)
            self.log(f"    {name:<6} upload {size / up / 1e6:7.1f} MB/s, "
                     f"load {size / down / 1e6:7.1f} MB/s")
        return out

    # -- many small files

    def small_round(self, count: int, size: int, order: list[str], sample: int
                    ) -> dict[str, tuple[float, float]]:
        """Files per second uploaded and loaded, per contender."""
        src = os.path.join(self.tmp, "small")
        names = fresh_tree(src, count, size, self.rng)
        out: dict[str, tuple[float, float]] = {}
        dest = os.path.join(self.tmp, "small-out")
        for name in order:
            shutil.rmtree(dest, ignore_errors=True)
            os.makedirs(dest)
            n = count
            if name == "ours":
                up, _ = self.ours_save(src)
                shutil.rmtree(dest)
                down = self.ours_load(dest)
            elif name == "s5cmd":
                t0 = time.perf_counter()
                self.s5("cp", src + "/", f"s3://{BUCKET}/s5cmd/")
                up = time.perf_counter() - t0
                t0 = time.perf_counter()
                self.s5("cp", f"s3://{BUCKET}/s5cmd/*", dest + "/")
                down = time.perf_counter() - t0
            else:
                pool = name == "boto3 pool"
                n = min(count, POOL_SAMPLE if pool else sample)
                client = self.pool_client if pool else self.client
                prefix = "pool/" if pool else "loop/"
                for d in {os.path.dirname(x) for x in names[:n]}:
                    os.makedirs(os.path.join(dest, d), exist_ok=True)

                def put(rel: str, client: Any = client, prefix: str = prefix) -> None:
                    client.upload_file(os.path.join(src, rel), BUCKET, prefix + rel)

                def get(rel: str, client: Any = client, prefix: str = prefix) -> None:
                    client.download_file(BUCKET, prefix + rel, os.path.join(dest, rel))

                up, down = (self._many(put, names[:n], pool), self._many(get, names[:n], pool))
            loaded = sum(len(fs) for _, _, fs in os.walk(dest))
            if loaded != n:
                raise RuntimeError(f"{name}: loaded {loaded} files, expected {n}")
            self.clean(dest)
            out[name] = (n / up, n / down)
            self.log(f"    {name:<10} upload {n / up:7.0f} files/s, load {n / down:7.0f} files/s"
                     + ("" if n == count else f" (over the first {n} files)"))
        return out

    @staticmethod
    def _many(fn: Callable[[str], None], names: list[str], pool: bool) -> float:
        t0 = time.perf_counter()
        if pool:
            with concurrent.futures.ThreadPoolExecutor(POOL_THREADS) as ex:
                list(ex.map(fn, names))
        else:
            for rel in names:
                fn(rel)
        return time.perf_counter() - t0


def _rotate(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def measure(size: int, files: int, file_size: int, repeat: int, *,
            delay_ms: float = WAN_DELAY_MS, bandwidth_mbps: float = WAN_BANDWIDTH_MBPS,
            loop_sample: int = 300, tmpdir: str | None = None,
            log: Callable[[str], None] = print, **settings: Any) -> list[Row]:
    """Rows of ours against each baseline; ``settings`` override ours' defaults (to try
    other part sizes and concurrencies: ``--part-size``, ``--concurrency``)."""
    med = statistics.median
    profile = f"WAN: {delay_ms:g} ms per request, {bandwidth_mbps:g} MB/s per connection"
    big: dict[str, list[tuple[float, float]]] = {"ours": [], "boto3": [], "s5cmd": []}
    small: dict[str, list[tuple[float, float]]] = {
        "ours": [], "boto3 loop": [], "boto3 pool": [], "s5cmd": []}
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="wan-") as tmp, \
            MemServer(delay_ms=delay_ms, bandwidth_mbps=bandwidth_mbps) as srv:
        wan = Wan(srv, tmp, log, **settings)
        try:
            s = wan.settings
            log(f"  {profile}; ours: part {s.part_size // MiB} MiB, "
                f"{s.upload_concurrency} requests in flight")
            # Round 0 warms every client up (connections, the worker), small and untimed.
            for rnd in range(repeat + 1):
                nbytes, count = (size, files) if rnd else (min(size, 64 * MiB), min(files, 200))
                log(f"  round {rnd}{' (warm-up)' if rnd == 0 else ''}: {nbytes / GiB:g} GiB")
                got = wan.big_round(nbytes, _rotate(list(big), rnd))
                if rnd:
                    for k, (up, down) in got.items():
                        big[k].append((size / up / 1e6, size / down / 1e6))
                log(f"  round {rnd}: {count:,} files of {file_size:,} B")
                got = wan.small_round(count, file_size, _rotate(list(small), rnd),
                                      min(loop_sample, 20) if rnd == 0 else loop_sample)
                if rnd:
                    for k, v in got.items():
                        small[k].append(v)
        finally:
            wan.close()
    rows = []
    for way, i in (("upload", 0), ("load", 1)):
        ours = [r[i] for r in big["ours"]]
        for base, goal, label in (("boto3", BIG_VS_BOTO3, "boto3 "
                                   + ("upload_file" if i == 0 else "download_file")),
                                  ("s5cmd", BIG_VS_S5CMD, "s5cmd cp")):
            theirs = [r[i] for r in big[base]]
            ratio = med(ours) / med(theirs)
            rows.append(Row(f"{way} of {size / GiB:g} GiB over a WAN vs {base}", med(ours),
                            "MB/s", label + " (defaults)", med(theirs), f">= {goal:.1f}x",
                            ratio >= goal, ratio, note=profile, samples=ours,
                            baseline_samples=theirs))
        ours = [r[i] for r in small["ours"]]
        for base in ("s5cmd", "boto3 pool", "boto3 loop"):
            theirs = [r[i] for r in small[base]]
            ratio = med(ours) / med(theirs)
            judged = base == "s5cmd"
            what = {"s5cmd": "s5cmd cp of the directory",
                    "boto3 pool": f"boto3, {POOL_THREADS} threads (first "
                                  f"{min(files, POOL_SAMPLE)} files)",
                    "boto3 loop": f"boto3 in a loop (first {min(files, loop_sample)} files)"}
            rows.append(Row(f"{way} of {files:,} files of {file_size:,} B over a WAN vs {base}",
                            med(ours), "files/s", what[base], med(theirs),
                            f">= {SMALL_VS_S5CMD:.1f}x" if judged else "report",
                            ratio >= SMALL_VS_S5CMD if judged else None, ratio, note=profile,
                            samples=ours, baseline_samples=theirs))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--file-size", default="4KiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--delay-ms", type=float, default=WAN_DELAY_MS)
    ap.add_argument("--bandwidth-mbps", type=float, default=WAN_BANDWIDTH_MBPS)
    ap.add_argument("--loop-sample", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=None,
                    help="ours' upload_concurrency (default: the package's)")
    ap.add_argument("--part-size", default=None, help="ours' part_size (default: the package's)")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    settings: dict[str, Any] = {}
    if args.concurrency:
        settings["upload_concurrency"] = args.concurrency
    if args.part_size:
        settings["part_size"] = parse_size(args.part_size)
        settings["multipart_threshold"] = max(Settings().multipart_threshold,
                                              settings["part_size"])
    rows = measure(parse_size(args.size), args.files, parse_size(args.file_size), args.repeat,
                   delay_ms=args.delay_ms, bandwidth_mbps=args.bandwidth_mbps,
                   loop_sample=args.loop_sample, tmpdir=args.dir, **settings)
    for r in rows:
        print(f"{r.benchmark}: {r.value:,.1f} {r.unit} vs {r.baseline_name} "
              f"{r.baseline:,.1f} ({r.ratio:.2f}x, target {r.target})")


if __name__ == "__main__":
    main()
