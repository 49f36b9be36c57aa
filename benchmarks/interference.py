"""How much an upload in flight slows a training loop, and how much the loop slows the upload.

The layout of a task on a 2-core machine, with only the GIL coupling the two sides: the
training loop runs on the main thread pinned to CPU 0; the uploader's threads (they inherit
the mask of the thread that starts them), a worker process where the mode has one, and an
in-memory S3 endpoint (``memserver.py``, a child process) all run on CPU 1. The endpoint's
own ingest speed on that core is measured first, with a bare blocking-socket client.

Reported for each uploader mode (``--modes thread,process``), medians of ``--repeat``
interleaved rounds:

- the loop's speed while a checkpoint of one ``--size`` file uploads, over its speed with
  the uploader idle (pure Python, and NumPy on small arrays);
- the upload's MB/s while the pure-Python loop runs, over its MB/s with the loop idle.

A control row separates the GIL from the machine: the same upload run by *another*
process (its own interpreter, so its own GIL) on CPU 1 while the loop runs. On machines
whose two CPUs share a physical core or a power budget (virtual machines often do), a busy
CPU 1 slows CPU 0 by itself; the control measures that, and "vs control" is the part of
the slowdown the uploader's sharing of the process causes. A round during which other
processes took more than 5% of the CPUs (a shared machine) is measured again, up to 4
times, and the medians are taken over the quiet rounds (the table says how many).

    python benchmarks/interference.py [--size 512MiB] [--repeat 3] [--modes thread,process]
"""

from __future__ import annotations

import os

# One BLAS thread, created on the loop's core: the NumPy loop must not spill onto CPU 1.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import boto3  # noqa: E402
from benchfiles import make_file  # noqa: E402
from benchkit import others_cpu_share  # noqa: E402
from benchrows import Row, median  # noqa: E402
from botocore.config import Config  # noqa: E402
from memserver import MemServer  # noqa: E402

from uploader import (  # noqa: E402
    CheckpointKeys,
    CheckpointState,
    Engine,
    SaveRequest,
    Scope,
    Settings,
    TransferContext,
    new_checkpoint_id,
)
from uploader.backends.s3 import S3Backend  # noqa: E402
from uploader.config import MiB, UploaderMode, parse_size  # noqa: E402

BUCKET = "bench"
LOOP_CPU, UPLOAD_CPU = 0, 1
GOAL_LOOP = 0.90
GOAL_UPLOAD = 0.75
QUIET_SHARE = 0.05  # of the machine's CPUs, taken by processes other than ours
MAX_TRIES = 4


def pin(cpu: int) -> None:
    """Pin the calling thread (Linux: pid 0 is the thread, not the process)."""
    os.sched_setaffinity(0, {cpu})


def can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


# -- the loops ------------------------------------------------------------------------

def python_step() -> int:
    """About a millisecond of pure-Python work that never releases the GIL."""
    acc, d = 0, {}
    for i in range(3000):
        acc = (acc * 31 + i) % 1_000_003
        d[i & 63] = acc
    return acc + len(d)


def numpy_step_factory() -> Callable[[], object]:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.random((48, 48))
    b = rng.random((48, 48))

    def step() -> object:
        x = a
        for _ in range(20):
            x = np.tanh(x @ b * 0.01) + a
        return x

    return step


def rate(step: Callable[[], object], until: Callable[[], bool]) -> float:
    """Steps per second from now until ``until()`` is true."""
    n, t0 = 0, time.perf_counter()
    while not until():
        for _ in range(5):
            step()
        n += 5
    return n / (time.perf_counter() - t0)


def for_seconds(seconds: float) -> Callable[[], bool]:
    end = time.perf_counter() + seconds
    return lambda: time.perf_counter() >= end


# -- the endpoint alone -------------------------------------------------------------

def ingest_alone(url: str, total: int, *, connections: int = 8, part: int = 16 * MiB) -> float:
    """MB/s the endpoint takes UploadPart-like PUTs at from a bare client on its core:
    blocking sockets, one ``sendall`` per body, nothing signed or hashed."""
    u = urllib.parse.urlsplit(url)
    body = memoryview(bytearray(os.urandom(1 << 20)) * (part >> 20))
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id="x",
                          aws_secret_access_key="x", region_name="us-east-1",
                          config=Config(s3={"addressing_style": "path"}))
    upload_id = client.create_multipart_upload(Bucket=BUCKET, Key="ingest")["UploadId"]
    count = total // part

    def worker(numbers: list[int]) -> None:
        with socket.create_connection((u.hostname, u.port)) as s:
            f = s.makefile("rb")
            for n in numbers:
                s.sendall(f"PUT /{BUCKET}/ingest?partNumber={n}&uploadId={upload_id} HTTP/1.1\r\n"
                          f"Host: {u.netloc}\r\nContent-Length: {part}\r\n\r\n".encode())
                s.sendall(body)
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        list(pool.map(worker, [list(range(i + 1, count + 1, connections))
                               for i in range(connections)]))
    seconds = time.perf_counter() - t0
    client.abort_multipart_upload(Bucket=BUCKET, Key="ingest", UploadId=upload_id)
    return count * part / seconds / 1e6


# -- the uploader -------------------------------------------------------------------

class Uploads:
    def __init__(self, tmp: str, url: str, size: int, mode: str, concurrency: int) -> None:
        self.size, self.url = size, url
        self.staging = os.path.join(tmp, f"staging-{mode}")
        os.makedirs(self.staging)
        make_file(os.path.join(self.staging, "model.bin"), size)
        self.scope = Scope("Bench", "user:bench", "train")
        self.client = boto3.client("s3", endpoint_url=url, aws_access_key_id="x",
                                   aws_secret_access_key="x", region_name="us-east-1",
                                   config=Config(s3={"addressing_style": "path"}))
        settings = Settings(upload_concurrency=concurrency, max_pending=1,
                            uploader=UploaderMode(mode), incremental=False)  # same file each time

        def factory(ctx: TransferContext) -> S3Backend:
            return S3Backend(ctx, bucket=BUCKET, prefix="ck", endpoint_url=url,
                             region="us-east-1", client_kwargs={
                                 "aws_access_key_id": "x", "aws_secret_access_key": "x"})

        self.engine = Engine(factory, settings, snapshot_dir=os.path.join(tmp, f"snap-{mode}"),
                             log=print)
        self.engine.backend  # noqa: B018  started here, so its threads inherit this mask

    def start(self) -> tuple[float, object]:
        keys = CheckpointKeys(self.scope.prefix, "1", new_checkpoint_id("1", 0))
        req = SaveRequest(source=self.staging, keys=keys, name="bench", latest=False,
                          metadata={}, identity={}, reference={})
        t0 = time.perf_counter()
        return t0, self.engine.save(req)

    def finish(self, t0: float, handle: object) -> float:
        from uploader import CheckpointHandle

        assert isinstance(handle, CheckpointHandle)
        handle.wait()
        seconds = time.perf_counter() - t0
        assert handle.state is CheckpointState.COMMITTED, handle.state
        self.clean()
        return self.size / seconds / 1e6

    def clean(self) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for page in pages:
            for obj in page.get("Contents", ()):
                self.client.delete_object(Bucket=BUCKET, Key=obj["Key"])

    def close(self) -> None:
        self.engine.close()


class ForeignUploads:
    """The same upload from a separate process: shares CPU 1 with ours, but not our GIL."""

    def __init__(self, tmp: str, url: str, size: int, concurrency: int) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", url, "--size", str(size),
             "--concurrency", str(concurrency), "--dir", tmp],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the control uploader did not start")

    def start(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self._done = False

    def done(self) -> bool:
        import select

        assert self.proc.stdout is not None
        if not self._done:
            self._done = bool(select.select([self.proc.stdout], [], [], 0)[0])
        return self._done

    def finish(self) -> float:
        assert self.proc.stdout is not None
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(60)


def child(url: str, size: int, concurrency: int, tmpdir: str) -> None:
    import sys

    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="control-") as tmp:
        u = Uploads(tmp, url, size, "thread", concurrency)
        u.finish(*u.start())  # warm-up
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "go":
                print(u.finish(*u.start()), flush=True)
        u.close()


@contextlib.contextmanager
def pinned_setup(tmp: str, size: int, modes: list[str], concurrency: int
                 ) -> Iterator[tuple[MemServer, dict[str, Uploads]]]:
    everywhere = os.sched_getaffinity(0)
    pin(UPLOAD_CPU)  # everything started from here on inherits CPU 1
    server = MemServer()
    uploads: dict[str, Uploads] = {}
    try:
        boto3.client("s3", endpoint_url=server.url, aws_access_key_id="x",
                     aws_secret_access_key="x", region_name="us-east-1",
                     config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=BUCKET)
        for mode in modes:
            uploads[mode] = Uploads(tmp, server.url, size, mode, concurrency)
        yield server, uploads
    finally:
        pin(UPLOAD_CPU)
        for u in uploads.values():
            u.close()
        server.close()
        # Give the calling thread all its CPUs back: the suite runs the other benchmarks
        # after this one in the same process, and its threads inherit this mask.
        os.sched_setaffinity(0, everywhere)


def measure(size: int, repeat: int, modes: list[str], *, concurrency: int = 16,
            tmpdir: str | None = None, idle_s: float = 1.0, tries: int = MAX_TRIES,
            log: Callable[[str], None] = print) -> list[Row]:
    if not can_pin():
        raise SystemExit("needs Linux and at least 2 CPUs to pin the loop and the upload apart")
    numpy_step = numpy_step_factory()
    res: dict[str, dict[str, list[float]]] = {
        m: {k: [] for k in ("py_idle", "py_busy", "np_idle", "np_busy", "up_idle", "up_busy")}
        for m in modes}
    control: dict[str, list[float]] = {"py_idle": [], "py_busy": [], "up_busy": []}
    noise: list[float] = []
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="interference-") as tmp, \
            pinned_setup(tmp, size, modes, concurrency) as (server, uploads):
        ingest = ingest_alone(server.url, min(size, 512 * MiB))
        log(f"  endpoint alone on CPU {UPLOAD_CPU}: {ingest:.0f} MB/s ingest "
            "(bare blocking client, 8 connections, 16 MiB bodies)")
        foreign = ForeignUploads(tmp, server.url, size, concurrency)  # pinned to CPU 1 too
        pin(LOOP_CPU)
        for name in modes:  # warm-up: connection pools, worker start
            u = uploads[name]
            u.finish(*u.start())
        def mode_round(u: Uploads) -> dict[str, float]:
            v = {"py_idle": rate(python_step, for_seconds(idle_s)),
                 "np_idle": rate(numpy_step, for_seconds(idle_s))}
            t0, h = u.start()
            v["up_idle"] = u.finish(t0, h)  # the main thread waits: the loop is idle
            t0, h = u.start()
            v["py_busy"] = rate(python_step, h.done)  # type: ignore[attr-defined]
            v["up_busy"] = u.finish(t0, h)
            t0, h = u.start()
            v["np_busy"] = rate(numpy_step, h.done)  # type: ignore[attr-defined]
            u.finish(t0, h)
            return v

        def control_round() -> dict[str, float]:
            v = {"py_idle": rate(python_step, for_seconds(idle_s))}
            foreign.start()
            v["py_busy"] = rate(python_step, foreign.done)
            v["up_busy"] = foreign.finish()
            return v

        def quiet(label: str, fn: Callable[[], dict[str, float]]
                  ) -> tuple[dict[str, float], bool]:
            # A round during which other processes took CPU time is measured again: on a
            # shared machine their work, not ours, would set the loop's speed.
            for _ in range(tries):
                v, share = others_cpu_share(fn)
                noise.append(share)
                if share <= QUIET_SHARE:
                    return v, True  # type: ignore[return-value]
                log(f"  {label}: other processes used {100 * share:.0f}% of the CPUs; again")
            return v, False  # type: ignore[return-value]

        rounds: dict[str, list[tuple[dict[str, float], bool]]] = {
            n: [] for n in [*modes, "control"]}
        for rnd in range(repeat):
            for name in modes if rnd % 2 == 0 else modes[::-1]:
                v, ok = quiet(f"round {rnd + 1} {name}", lambda n=name: mode_round(uploads[n]))
                rounds[name].append((v, ok))
                log(f"  round {rnd + 1} {name:<8} loop py {v['py_busy'] / v['py_idle']:.2f}x"
                    f"  np {v['np_busy'] / v['np_idle']:.2f}x  upload idle "
                    f"{v['up_idle']:.0f} MB/s, during loop {v['up_busy']:.0f} MB/s"
                    + ("" if ok else "  (not quiet)"))
            v, ok = quiet(f"round {rnd + 1} control", control_round)
            rounds["control"].append((v, ok))
            log(f"  round {rnd + 1} control  loop py {v['py_busy'] / v['py_idle']:.2f}x while "
                f"another process uploads at {v['up_busy']:.0f} MB/s"
                + ("" if ok else "  (not quiet)"))
        # Medians over the quiet rounds, where there are any.
        used: dict[str, str] = {}
        for name, rs in rounds.items():
            keep = [v for v, ok in rs if ok] or [v for v, _ in rs]
            used[name] = f"{sum(ok for _, ok in rs)} of {len(rs)} rounds quiet"
            into = control if name == "control" else res[name]
            for v in keep:
                for k, x in v.items():
                    into[k].append(x)
        pin(UPLOAD_CPU)
        foreign.close()
    rows = []
    c_ratio = median([b / i for b, i in zip(control["py_busy"], control["py_idle"], strict=True)])
    rows.append(Row(
        "control: loop speed while another process uploads (pure Python)",
        median(control["py_busy"]), "steps/s", "same loop, nothing uploading",
        median(control["py_idle"]), "reported (the machine's share)", None, c_ratio,
        note=f"upload at {median(control['up_busy']):.0f} MB/s from a separate process; "
             f"{used['control']}; other processes' share of the CPUs per round: median "
             f"{100 * median(noise):.0f}%, max {100 * max(noise):.0f}%",
        samples=control["py_busy"], baseline_samples=control["py_idle"]))
    for name in modes:
        r = res[name]
        for loop, key in (("pure Python", "py"), ("NumPy", "np")):
            ratios = [b / i for b, i in zip(r[f"{key}_busy"], r[f"{key}_idle"], strict=True)]
            ratio = median(ratios)
            note = (f"{ratio / c_ratio:.2f}x of the control (upload from another process); "
                    f"{used[name]}" if key == "py" else used[name])
            rows.append(Row(
                f"training-loop speed while uploading ({loop}, {name})",
                median(r[f"{key}_busy"]), "steps/s", "same loop, idle uploader",
                median(r[f"{key}_idle"]), f">= {GOAL_LOOP:.2f}x", ratio >= GOAL_LOOP, ratio,
                note=note, samples=r[f"{key}_busy"], baseline_samples=r[f"{key}_idle"]))
        ratios = [b / i for b, i in zip(r["up_busy"], r["up_idle"], strict=True)]
        ratio = median(ratios)
        rows.append(Row(
            f"upload speed during the pure-Python loop ({name})", median(r["up_busy"]), "MB/s",
            "same upload, idle loop", median(r["up_idle"]), f">= {GOAL_UPLOAD:.2f}x",
            ratio >= GOAL_UPLOAD, ratio,
            note=f"{size / MiB:.0f} MiB; endpoint alone ingests {ingest:.0f} MB/s on CPU 1; "
                 f"{used[name]}",
            samples=r["up_busy"], baseline_samples=r["up_idle"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="thread,process")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # the control's uploader
    args = ap.parse_args()
    if args.child:
        child(args.child, parse_size(args.size), args.concurrency, args.dir)
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from benchkit import raise_priority

    raise_priority()
    rows = measure(parse_size(args.size), args.repeat, modes, concurrency=args.concurrency,
                   tmpdir=args.dir)
    print()
    for row in rows:
        verdict = "met" if row.met else "NOT met"
        verdict = "reported" if row.met is None else verdict
        print(f"{row.benchmark:<66} {row.value:8.1f} {row.unit:<8} vs {row.baseline:8.1f}: "
              f"{row.ratio:.2f}x (target {row.target}: {verdict}) {row.note}")


if __name__ == "__main__":
    main()
