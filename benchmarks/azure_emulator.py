"""Azure Blob Storage on its emulator: upload and load throughput against the SDK, and the
training loop's speed while an upload runs. Emulator figures: Azurite (Node.js, blobs in
memory, HTTPS on 127.0.0.1) shares this machine's CPUs with both clients, so its own work
sets much of the pace; the ratios, not the MB/s, are what carry over to Azure.

One file of random bytes is uploaded, in interleaved rounds, by:

* ours: an ``Engine`` with an ``AzureBackend`` (Put Block with a per-block MD5 the service
  checks, then Put Block List setting the blob's Content-MD5; the file's SHA-256 computed
  while reading; a manifest written last), timed from ``save()`` to the commit; blocks go
  out from the upload worker process, or with ``--uploader thread`` from threads of this
  process;
* the SDK: azure-storage-blob's synchronous ``upload_blob`` with the same block size and
  concurrency (no checksum of its own unless asked).

and loaded by ``Engine.load`` (ranged GETs, SHA-256 verified) against the SDK's
``download_blob(max_concurrency=N).readinto``. The loop row: a pure-Python loop's speed
while ours uploads, over its speed while the same upload is done by another process (its
own interpreter: the part of the slowdown that sharing this process's GIL causes); the loop
alone on CPU 0, everything else on CPU 1. On a machine shared with other work the loop's
speed swings from round to round; the CPU row does not: the CPU-seconds per GiB this
process spent outside the loop's thread while ours uploaded, which is what the upload took
from the loop's interpreter.

    python benchmarks/azure_emulator.py [--size 256MiB] [--repeat 3] [--uploader thread]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the emulator's runner

from benchfiles import make_file  # noqa: E402
from benchkit import SCOPE, committed, request  # noqa: E402
from benchrows import Row  # noqa: E402

from uploader import Engine, Settings, TransferContext  # noqa: E402
from uploader.catalog import Catalog  # noqa: E402
from uploader.config import MiB, UploaderMode, parse_size  # noqa: E402

CONTAINER = "bench"
# With two CPUs or more, the loop runs alone on CPU 0 and everything else (the emulator,
# the uploader's threads, the control's process) on CPU 1, as in interference.py: only the
# GIL couples the loop to an upload in its own process.
_PINNED = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2
NOTE = "Azurite emulator on this machine"
DEFAULT_UPLOADER = Settings().uploader  # METAFLOW_CHECKPOINT_UPLOADER's default


@contextlib.contextmanager
def emulator(tmp: str) -> Iterator[Any]:
    from azurite import running_azurite

    with running_azurite(Path(tmp) / "azurite") as az:
        az.service().create_container(CONTAINER)
        yield az


def _engine(az: Any, tmp: str, concurrency: int, block: int, uploader: UploaderMode
            ) -> Engine:
    from uploader.backends.azure import AzureBackend

    def factory(ctx: TransferContext) -> AzureBackend:
        return AzureBackend(ctx, account_url=az.account_url, container=CONTAINER,
                            prefix="ours", credential=az.credential(), verify=az.ca_bundle)

    settings = Settings(upload_concurrency=concurrency, part_size=block,
                        multipart_threshold=2 * block, uploader=uploader,
                        incremental=False)  # every save sends its bytes
    return Engine(factory, settings, snapshot_dir=os.path.join(tmp, "snap"), log=print)


def _sdk_blob(az: Any, concurrency: int, block: int, name: str) -> Any:
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient(az.account_url, credential=az.credential(),
                                connection_verify=az.ca_bundle, max_block_size=block,
                                max_single_put_size=2 * block, max_single_get_size=block,
                                max_chunk_get_size=block)
    return service.get_blob_client(CONTAINER, name)


def _sdk_upload(az: Any, path: str, concurrency: int, block: int, name: str) -> None:
    with open(path, "rb") as f:
        _sdk_blob(az, concurrency, block, name).upload_blob(
            f, overwrite=True, max_concurrency=concurrency, length=os.path.getsize(path))


def _sdk_download(az: Any, dest: str, concurrency: int, block: int, name: str) -> None:
    with open(dest, "wb") as f:
        _sdk_blob(az, concurrency, block, name).download_blob(
            max_concurrency=concurrency).readinto(f)


def _upload_in_child(args: tuple[Any, ...]) -> None:
    account_url, ca, path, concurrency, block = args
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from azure.core.credentials import AzureNamedKeyCredential
    from azure.storage.blob import BlobServiceClient
    from azurite import ACCOUNT, KEY

    service = BlobServiceClient(account_url, credential=AzureNamedKeyCredential(ACCOUNT, KEY),
                                connection_verify=ca, max_block_size=block,
                                max_single_put_size=2 * block)
    with open(path, "rb") as f:
        service.get_blob_client(CONTAINER, "control").upload_blob(
            f, overwrite=True, max_concurrency=concurrency)


def _loop_rate(while_running: Callable[[], None]) -> tuple[float, float]:
    """Iterations per second of a pure-Python loop while ``while_running()`` runs, and the
    CPU-seconds this process spent meanwhile outside the loop's thread: what the upload
    cost the loop's interpreter, which the machine's other load does not change."""
    done = threading.Event()
    count = 0
    loop_cpu = 0.0

    def loop() -> None:
        nonlocal count, loop_cpu
        if _PINNED:
            os.sched_setaffinity(0, {0})  # this thread alone on CPU 0
        started = time.thread_time()
        x = 0
        while not done.is_set():
            for i in range(1000):
                x += i * i % 7
            count += 1
        loop_cpu = time.thread_time() - started

    t = threading.Thread(target=loop)
    cpu0 = _process_cpu()
    t0 = time.perf_counter()
    t.start()
    try:
        while_running()
    finally:
        done.set()
        t.join()
    return count / (time.perf_counter() - t0), _process_cpu() - cpu0 - loop_cpu


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread, not the children
    return usage.ru_utime + usage.ru_stime


def measure(size: int, repeat: int, *, concurrency: int = 16, block: int = 16 * MiB,
            uploader: UploaderMode = DEFAULT_UPLOADER, tmpdir: str | None = None,
            log: Callable[[str], None] = print) -> list[Row]:
    med = statistics.median
    before = os.sched_getaffinity(0) if _PINNED else None
    if before is not None:
        os.sched_setaffinity(0, {1})  # inherited by every thread and child started below
    try:
        return _measure(size, repeat, concurrency=concurrency, block=block,
                        uploader=uploader, tmpdir=tmpdir, log=log, med=med)
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)


def _measure(size: int, repeat: int, *, concurrency: int, block: int,
             uploader: UploaderMode, tmpdir: str | None,
             log: Callable[[str], None], med: Callable[[list[float]], float]) -> list[Row]:
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="azure-bench-") as tmp, \
            emulator(tmp) as az:
        staging = os.path.join(tmp, "staging")
        os.makedirs(staging)
        src = os.path.join(staging, "model.bin")
        make_file(src, size)
        engine = _engine(az, tmp, concurrency, block, uploader)
        up_ours: list[float] = []
        up_sdk: list[float] = []
        down_ours: list[float] = []
        down_sdk: list[float] = []
        loop_ours: list[float] = []
        loop_control: list[float] = []
        cpu_ours: list[float] = []
        cpu_control: list[float] = []
        try:
            for i in range(repeat + 1):  # the first round warms both up, untimed
                t0 = time.perf_counter()
                committed(engine.save(request(staging, run_id=str(i + 1))))
                t_ours = time.perf_counter() - t0
                t0 = time.perf_counter()
                _sdk_upload(az, src, concurrency, block, f"sdk-{i}")
                t_sdk = time.perf_counter() - t0
                entry = next(e for e in Catalog(engine).entries(SCOPE.prefix)
                             if e.keys.run_id == str(i + 1))
                out = os.path.join(tmp, f"out-{i}")
                t0 = time.perf_counter()
                Catalog(engine).load(entry, out)
                t_load = time.perf_counter() - t0
                dest = os.path.join(tmp, f"sdk-{i}.bin")
                t0 = time.perf_counter()
                _sdk_download(az, dest, concurrency, block, f"sdk-{i}")
                t_dl = time.perf_counter() - t0
                assert os.path.getsize(dest) == size
                with contextlib.suppress(OSError):
                    os.unlink(dest)
                    os.unlink(os.path.join(out, "model.bin"))
                # The loop while ours uploads, and while another process does the same.
                loop, cpu = _loop_rate(lambda: committed(engine.save(request(staging,
                                                                             run_id="loop"))))
                ctx = multiprocessing.get_context("spawn")
                with ctx.Pool(1) as pool:
                    control, cpu_c = _loop_rate(lambda: pool.apply(
                        _upload_in_child, ((az.account_url, az.ca_bundle, src, concurrency,
                                            block),)))
                if i:
                    up_ours.append(t_ours)
                    up_sdk.append(t_sdk)
                    down_ours.append(t_load)
                    down_sdk.append(t_dl)
                    loop_ours.append(loop)
                    loop_control.append(control)
                    cpu_ours.append(cpu / (size / 2**30))
                    cpu_control.append(cpu_c / (size / 2**30))
                log(f"round {i}: upload ours {t_ours:.2f}s sdk {t_sdk:.2f}s; load ours "
                    f"{t_load:.2f}s sdk {t_dl:.2f}s; loop {loop:.0f}/s vs control "
                    f"{control:.0f}/s; CPU outside the loop {cpu:.2f}s vs {cpu_c:.2f}s")
        finally:
            engine.close()
    mb = size / 1e6

    def rate(ts: list[float]) -> float:
        return mb / med(ts)

    label = f"{size // MiB} MiB, {NOTE}"
    if uploader is not DEFAULT_UPLOADER:
        label += f", uploader={uploader.value}"
    return [
        Row(f"Azure upload throughput ({label})", rate(up_ours), "MB/s",
            "azure-storage-blob upload_blob", rate(up_sdk), ">= the SDK's", None,
            ratio=rate(up_ours) / rate(up_sdk), note="emulator figure",
            samples=up_ours, baseline_samples=up_sdk),
        Row(f"Azure load throughput ({label})", rate(down_ours), "MB/s",
            "azure-storage-blob download_blob", rate(down_sdk), ">= the SDK's", None,
            ratio=rate(down_ours) / rate(down_sdk), note="emulator figure",
            samples=down_ours, baseline_samples=down_sdk),
        Row(f"Python loop speed while an Azure upload runs ({label})", med(loop_ours),
            "iter/s", "same upload by another process", med(loop_control), "~0.9x or more",
            None, ratio=med(loop_ours) / med(loop_control), note="emulator figure",
            samples=loop_ours, baseline_samples=loop_control),
        # Reported, not judged: the control's figure is the pool's bookkeeping alone.
        Row(f"Task CPU outside the loop while an Azure upload runs ({label})",
            med(cpu_ours), "CPU-s/GiB", "same upload by another process", med(cpu_control),
            "well below the thread mode's", None, note="emulator figure",
            samples=cpu_ours, baseline_samples=cpu_control),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--block-size", default="16MiB")
    ap.add_argument("--uploader", choices=[m.value for m in UploaderMode],
                    default=DEFAULT_UPLOADER.value,
                    help="where blocks are read, hashed and sent (METAFLOW_CHECKPOINT_UPLOADER)")
    args = ap.parse_args()
    for r in measure(parse_size(args.size), args.repeat, concurrency=args.concurrency,
                     block=parse_size(args.block_size), uploader=UploaderMode(args.uploader)):
        ratio = f" ({r.ratio:.2f}x)" if r.ratio is not None else ""
        print(f"{r.benchmark}: {r.value:.3g} {r.unit} vs {r.baseline_name} "
              f"{r.baseline:.3g}{ratio}")


if __name__ == "__main__":
    main()
