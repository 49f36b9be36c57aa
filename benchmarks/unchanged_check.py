"""How fast an incremental save checks unchanged bytes while a Python loop runs.

The set-up of ``interference.py``: the loop on the main thread pinned to CPU 0; the
engine's threads, its upload worker process and the endpoint on CPU 1. The endpoint is
moto's S3 server, which keeps the checksums an unchanged file is confirmed against (the
in-memory endpoint keeps none, so every file would be uploaded again after its check). One
file of ``--size`` is committed once; every later save of it finds it unchanged, and
its whole cost is reading and hashing the file. Timed per round: that save with the
loop idle (the main thread waits), then with the pure-Python loop running; the figure
is busy MB/s over idle MB/s, per uploader mode (``process``: the check is read in the
worker process; ``thread``: in threads of this process, sharing the loop's GIL). A
control row times the same read and hash by another process on CPU 1 (its own GIL),
idle and busy: what the machine alone takes from the figure.

    python benchmarks/unchanged_check.py [--size 256MiB] [--repeat 3] [--modes process,thread]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from benchfiles import make_file
from benchrows import Row, median
from interference import (
    BUCKET,
    LOOP_CPU,
    UPLOAD_CPU,
    can_pin,
    pin,
    python_step,
    rate,
)

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
from uploader.config import MiB, UploaderMode, parse_size

GOAL = 0.90
SCOPE = Scope("Bench", "user:bench", "train")


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server in a child process (on the CPUs of the calling thread)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if proc.poll() is not None:
                raise SystemExit(f"moto's S3 server exited ({proc.returncode}) before it "
                                 "listened: is moto[server] installed (the bench extra)?")
            time.sleep(0.1)  # polling a port that is not open yet
        else:
            raise SystemExit(f"moto's S3 server did not listen on port {port} within 60 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def _engine(tmp: str, url: str, mode: str) -> Engine:
    def factory(ctx: TransferContext) -> S3Backend:
        return S3Backend(ctx, bucket=BUCKET, prefix="ck", endpoint_url=url, region="us-east-1",
                         client_kwargs={"aws_access_key_id": "x", "aws_secret_access_key": "x"})

    return Engine(factory, Settings(max_pending=1, uploader=UploaderMode(mode)),
                  snapshot_dir=os.path.join(tmp, f"snap-{mode}"), log=print)


def _control(path: str) -> subprocess.Popen[bytes]:
    """The same read and hash by another process on CPU 1: its own interpreter and GIL."""
    code = ("import sys; from uploader.incremental import sha256_file; "
            "sha256_file(sys.argv[1])")
    return subprocess.Popen([sys.executable, "-c", code, path],
                            preexec_fn=lambda: os.sched_setaffinity(0, {UPLOAD_CPU}))


def _save(engine: Engine, staging: str) -> object:
    keys = CheckpointKeys(SCOPE.prefix, "1", new_checkpoint_id("1", 0))
    return engine.save(SaveRequest(source=staging, keys=keys, name="bench", latest=True,
                                   metadata={}, identity={}, reference={}))


def measure(size: int, repeat: int, modes: list[str], *, tmpdir: str | None = None,
            log: Callable[[str], None] = print) -> list[Row]:
    if not can_pin():
        raise SystemExit("needs Linux and at least 2 CPUs to pin the loop and the check apart")
    everywhere = os.sched_getaffinity(0)
    rows = []
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="unchanged-") as tmp:
        staging = os.path.join(tmp, "staging")
        os.makedirs(staging)
        make_file(os.path.join(staging, "base.bin"), size)
        pin(UPLOAD_CPU)
        server = moto_server()
        url = server.__enter__()
        engines: dict[str, Engine] = {}
        try:
            import boto3
            from botocore.config import Config

            boto3.client("s3", endpoint_url=url, aws_access_key_id="x",
                         aws_secret_access_key="x", region_name="us-east-1",
                         config=Config(s3={"addressing_style": "path"})
                         ).create_bucket(Bucket=BUCKET)
            for m in modes:
                engines[m] = e = _engine(tmp, url, m)
                e.backend  # noqa: B018  its threads and worker inherit CPU 1
                h = _save(e, staging)  # uploaded once: later saves find it unchanged
                h.wait()  # type: ignore[attr-defined]
            pin(LOOP_CPU)
            got: dict[str, dict[str, list[float]]] = {
                m: {"idle": [], "busy": []} for m in [*modes, "control"]}
            for _ in range(repeat):
                for kind in ("idle", "busy"):
                    t0 = time.perf_counter()
                    proc = _control(os.path.join(staging, "base.bin"))
                    if kind == "busy":
                        rate(python_step, lambda p=proc: p.poll() is not None)
                    proc.wait()
                    got["control"][kind].append(size / (time.perf_counter() - t0) / 1e6)
                for m, e in engines.items():
                    for kind in ("idle", "busy"):
                        t0 = time.perf_counter()
                        h = _save(e, staging)
                        if kind == "busy":
                            rate(python_step, h.done)  # type: ignore[attr-defined]
                        h.wait()  # type: ignore[attr-defined]
                        took = time.perf_counter() - t0
                        assert h.state is CheckpointState.COMMITTED  # type: ignore[attr-defined]
                        assert h.stats.bytes_skipped == size  # type: ignore[attr-defined]
                        got[m][kind].append(size / took / 1e6)
        finally:
            pin(UPLOAD_CPU)
            for e in engines.values():
                e.close()
            server.__exit__(None, None, None)
            os.sched_setaffinity(0, everywhere)
    control = median(got["control"]["busy"]) / median(got["control"]["idle"])
    log(f"  control (another process hashing on CPU 1): {control:.2f}x")
    for m in modes:
        idle, busy = median(got[m]["idle"]), median(got[m]["busy"])
        log(f"  {m}: unchanged check {idle:.0f} MB/s idle, {busy:.0f} MB/s with the loop "
            f"running ({busy / idle:.2f}x)")
        rows.append(Row(
            f"unchanged check of {size // MiB} MiB while a Python loop runs ({m} uploader)",
            busy, "MB/s", "the same check with the loop idle", idle, f">= {GOAL:.2f}x idle",
            met=busy / idle >= GOAL if m == "process" else None, ratio=busy / idle,
            note=f"ratio = busy / idle; engine-level; control {control:.2f}x",
            samples=got[m]["busy"], baseline_samples=got[m]["idle"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="process,thread")
    args = ap.parse_args()
    for r in measure(parse_size(args.size), args.repeat, args.modes.split(",")):
        print(f"{r.benchmark}: {r.value:.0f} MB/s (idle {r.baseline:.0f}; {r.ratio:.2f}x; "
              f"target {r.target})")


if __name__ == "__main__":
    main()
