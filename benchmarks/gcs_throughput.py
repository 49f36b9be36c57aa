"""Upload and load throughput on a GCS emulator (fake-gcs-server on loopback), beside
google-cloud-storage doing the same transfer, and the training loop's speed meanwhile.

Emulator figures: they measure the client side (ours: resumable chunks with CRC32C and
SHA-256 computed as the file is read, ranged parallel loads; Google's client:
``upload_from_filename`` in resumable chunks of the same size, ``download_to_filename``
with its own CRC32C check) against a local Go server, not GCS's network. Interleaved
rounds, the first untimed. The GIL rows: a pure-Python loop's step rate while our upload
runs in a thread of the same process, against the same loop idle
(``interference.python_step``); and, as the control that separates the GIL from the
machine (the emulator and the upload need CPU too), the loop while the same upload runs
in another process.

    python benchmarks/gcs_throughput.py [--size 256MiB] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import anyio
from benchfiles import make_file
from benchrows import Row
from interference import for_seconds, python_step, rate

from uploader.backends.base import TransferContext
from uploader.config import MiB, Settings, parse_size
from uploader.retry import RetryPolicy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from gcsserver import running_gcs_server

BUCKET = "bench"


def _ctx(concurrency: int, part: int) -> TransferContext:
    return TransferContext(
        settings=Settings(part_size=part, multipart_threshold=2 * part,
                          upload_concurrency=concurrency),
        limiter=anyio.CapacityLimiter(concurrency), retry=RetryPolicy())


def measure(size: int, repeat: int, *, concurrency: int = 16, part: int = 16 * MiB,
            tmpdir: str | None = None, log: Callable[[str], None] = print) -> list[Row]:
    from uploader.backends.gcs import GCSBackend

    med = statistics.median
    up, up_sdk, down, down_sdk, loop_busy, loop_idle, loop_ctl = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="gcs-") as tmp, \
            running_gcs_server() as srv:
        srv.create_bucket(BUCKET)
        src = os.path.join(tmp, "model.bin")
        make_file(src, size)
        bucket = srv.client().bucket(BUCKET)

        async def ours_up(key: str) -> None:
            b = GCSBackend(_ctx(concurrency, part), bucket=BUCKET, prefix="",
                           endpoint=srv.endpoint)
            try:
                await b.put_file(key, src, size)
            finally:
                await b.aclose()

        async def ours_down(key: str, dest: str) -> None:
            b = GCSBackend(_ctx(concurrency, part), bucket=BUCKET, prefix="",
                           endpoint=srv.endpoint)
            try:
                await b.get_file(key, dest, size)
            finally:
                await b.aclose()

        for i in range(repeat + 1):
            t0 = time.perf_counter()
            anyio.run(ours_up, f"ours-{i}")
            t_up = time.perf_counter() - t0
            blob = bucket.blob(f"sdk-{i}", chunk_size=part)
            t0 = time.perf_counter()
            blob.upload_from_filename(src)
            t_up_sdk = time.perf_counter() - t0
            dest = os.path.join(tmp, "out.bin")
            t0 = time.perf_counter()
            anyio.run(ours_down, f"ours-{i}", dest)
            t_down = time.perf_counter() - t0
            os.unlink(dest)
            t0 = time.perf_counter()
            bucket.blob(f"sdk-{i}").download_to_filename(dest)
            t_down_sdk = time.perf_counter() - t0
            os.unlink(dest)
            # The loop beside an upload of ours, then idle for as long.
            done = threading.Event()

            def upload_then_set(key: str, done: threading.Event = done) -> None:
                anyio.run(ours_up, key)
                done.set()

            th = threading.Thread(target=upload_then_set, args=(f"gil-{i}",))
            th.start()
            t0 = time.perf_counter()
            busy = rate(python_step, done.is_set)
            took = time.perf_counter() - t0
            th.join()
            idle = rate(python_step, for_seconds(took))
            child = subprocess.Popen([sys.executable, __file__, "--child", srv.endpoint, src,
                                      str(size), str(concurrency), str(part), f"ctl-{i}"])
            ctl = rate(python_step, lambda proc=child: proc.poll() is not None)
            if child.wait() != 0:
                raise RuntimeError("the control upload failed")
            if i:
                loop_ctl.append(ctl / idle)
                up.append(size / t_up / 1e6)
                up_sdk.append(size / t_up_sdk / 1e6)
                down.append(size / t_down / 1e6)
                down_sdk.append(size / t_down_sdk / 1e6)
                loop_busy.append(busy)
                loop_idle.append(idle)
                log(f"  round {i}: upload {up[-1]:.0f} vs {up_sdk[-1]:.0f} MB/s, load "
                    f"{down[-1]:.0f} vs {down_sdk[-1]:.0f} MB/s, loop {busy / idle:.2f}x "
                    f"(another process uploading: {ctl / idle:.2f}x)")
    gib = f"{size / MiB:g} MiB"
    gil = med(loop_busy) / med(loop_idle)
    ctl = med(loop_ctl)
    return [
        Row(f"GCS upload of a {gib} file", med(up), "MB/s",
            "google-cloud-storage upload_from_filename", med(up_sdk), "reported", None,
            med(up) / med(up_sdk), note="emulator figures (fake-gcs-server on loopback)",
            samples=up, baseline_samples=up_sdk),
        Row(f"GCS load of a {gib} file", med(down), "MB/s",
            "google-cloud-storage download_to_filename", med(down_sdk), "reported", None,
            med(down) / med(down_sdk), note="emulator figures; ours verifies the SHA-256",
            samples=down, baseline_samples=down_sdk),
        Row("GCS: training loop speed during an upload", gil, "x of idle",
            "the same loop, idle", 1.0, ">= 0.9x", gil >= 0.9, gil,
            note="emulator; pure-Python loop, GIL shared with the upload",
            samples=[b / i for b, i in zip(loop_busy, loop_idle, strict=True)]),
        Row("GCS: training loop speed during the same upload in another process", ctl,
            "x of idle", "the same loop, idle", 1.0, "reported (control)", None, ctl,
            note="emulator; no GIL shared: what the machine alone costs", samples=loop_ctl),
    ]


def child(endpoint: str, src: str, size: int, concurrency: int, part: int, key: str) -> None:
    from uploader.backends.gcs import GCSBackend

    async def up() -> None:
        b = GCSBackend(_ctx(concurrency, part), bucket=BUCKET, prefix="", endpoint=endpoint)
        try:
            await b.put_file(key, src, size)
        finally:
            await b.aclose()

    anyio.run(up)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        endpoint, src, size, concurrency, part, key = args.child
        child(endpoint, src, int(size), int(concurrency), int(part), key)
        return
    for r in measure(parse_size(args.size), args.repeat):
        print(r)


if __name__ == "__main__":
    main()
