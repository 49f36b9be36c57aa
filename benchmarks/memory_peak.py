"""Peak memory while a large checkpoint uploads to S3, against the memory before it.

One file (4 GiB by default) is saved to the in-memory endpoint (``memserver.py``, a
separate process whose memory is not counted). The resident set of this process and of
its upload worker (in ``process`` mode) is sampled every 20 ms from ``/proc``; the
baseline is the same sum just before ``save()``, after a small warm-up upload (so the
worker, the clients and their pools exist, as they do in a task after its first save).
The claim: the peak stays within concurrency x part size + 64 MiB above the baseline.

    python benchmarks/memory_peak.py [--size 4GiB] [--modes process,thread]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from collections.abc import Callable

from benchfiles import make_file
from benchkit import BUCKET, committed, empty_bucket, request, s3_client, s3_engine
from benchrows import Row
from memserver import MemServer

from uploader.config import MiB, UploaderMode, parse_size

HEADROOM = 64 * MiB


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(skip: set[int]) -> int:
    """RSS of this process and its descendants, except the pids in ``skip`` (and theirs)."""
    me = os.getpid()
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    total, todo = 0, [me]
    while todo:
        pid = todo.pop()
        if pid in skip:
            continue
        total += rss(pid)
        todo.extend(p for p, pp in parents.items() if pp == pid)
    return total


def _sample(stop: threading.Event, skip: set[int], peaks: list[int]) -> None:
    while not stop.wait(0.02):
        peaks.append(tree_rss(skip))


def measure(size: int, modes: list[str], *, concurrency: int = 16, part_size: int = 16 * MiB,
            tmpdir: str | None = None, log: Callable[[str], None] = print) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="memory-") as tmp, MemServer() as srv:
        client = s3_client(srv.url)
        client.create_bucket(Bucket=BUCKET)
        staging, warm = os.path.join(tmp, "staging"), os.path.join(tmp, "warm")
        os.makedirs(staging)
        os.makedirs(warm)
        make_file(os.path.join(staging, "model.bin"), size)
        make_file(os.path.join(warm, "model.bin"), 64 * MiB)
        for mode in modes:
            engine = s3_engine(srv.url, tmp, name=mode, upload_concurrency=concurrency,
                               part_size=part_size, uploader=UploaderMode(mode),
                               incremental=False)
            try:
                committed(engine.save(request(warm)))
                empty_bucket(client)
                skip = {srv.proc.pid}
                before = tree_rss(skip)
                stop = threading.Event()
                peaks = [before]
                sampler = threading.Thread(target=_sample, args=(stop, skip, peaks))
                sampler.start()
                try:
                    committed(engine.save(request(staging)))
                finally:
                    stop.set()
                    sampler.join()
                empty_bucket(client)
            finally:
                engine.close()
            peak = max(peaks)
            above = peak - before
            bound = concurrency * part_size + HEADROOM
            log(f"  {mode}: RSS before {before / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB "
                f"(+{above / MiB:.0f} MiB; bound +{bound / MiB:.0f} MiB)")
            rows.append(Row(
                f"peak RSS above baseline while {size / (1 << 30):g} GiB uploads ({mode})",
                above / MiB, "MiB", "RSS before (MiB)", before / MiB,
                f"<= {bound / MiB:.0f} MiB (concurrency x part + 64 MiB)", above <= bound,
                above / bound, note="ratio = growth / bound; task and worker processes",
                samples=[above / MiB], baseline_samples=[before / MiB]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4GiB")
    ap.add_argument("--modes", default="process,thread")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    for r in measure(parse_size(args.size), args.modes.split(","), tmpdir=args.dir):
        print(f"{r.benchmark}: +{r.value:.0f} MiB over {r.baseline:.0f} MiB "
              f"(target {r.target}: {'met' if r.met else 'NOT met'})")


if __name__ == "__main__":
    main()
