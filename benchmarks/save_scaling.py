"""How long save() blocks, as the checkpoint grows in bytes and in files.

- One file of 1 MiB ... 4 GiB: ``save()`` on the engine (local backend) against
  ``shutil.copytree`` of the same directory, in the same run. The claim: flat in bytes,
  and at 1 GiB at least 300x less blocking than the copy.
- 1 ... 10,000 small files (100 bytes each): ``save()`` against the same copy; the claim
  is at most 50 microseconds per file.

Each upload is drained, the copy's output removed and the page cache synced before the
next timing, and the saves are timed before the copies, so no background work or
write-back lands in another measurement.

    python benchmarks/save_scaling.py [--sizes 1MiB,64MiB,1GiB,4GiB] [--counts 1,100,1000,10000]
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
from benchkit import committed, local_engine, request
from benchrows import Row

from uploader.config import MiB, parse_size

GOAL_1GIB = 300.0
GOAL_PER_FILE_US = 50.0


def _times(engine: object, staging: str, tmp: str, repeat: int) -> tuple[list[float], list[float]]:
    from uploader import Engine

    assert isinstance(engine, Engine)
    save_s, copy_s = [], []
    # The saves first, then the copies: a copy's write-back (a whole file, or ten thousand)
    # would otherwise still be in the filesystem's journal when the next save() links.
    for _ in range(repeat):
        os.sync()
        t0 = time.perf_counter()
        h = engine.save(request(staging))
        save_s.append(time.perf_counter() - t0)
        committed(h)
    for i in range(repeat):
        os.sync()
        dst = os.path.join(tmp, f"copy-{i}")
        t0 = time.perf_counter()
        shutil.copytree(staging, dst)
        copy_s.append(time.perf_counter() - t0)
        shutil.rmtree(dst)
    return save_s, copy_s


def measure(sizes: list[int], counts: list[int], repeat: int, *, tmpdir: str | None = None,
            log: Callable[[str], None] = print) -> list[Row]:
    rows: list[Row] = []
    med = statistics.median
    with tempfile.TemporaryDirectory(dir=tmpdir, prefix="save-scaling-") as tmp:
        engine = local_engine(tmp, max_pending=2)  # a slot is free: save() never waits
        engine.backend  # noqa: B018  the uploader starts with the task, before any save
        try:
            by_size = {}
            for size in sizes:
                staging = os.path.join(tmp, f"size-{size}")
                os.makedirs(staging)
                make_file(os.path.join(staging, "model.bin"), size)
                save_s, copy_s = _times(engine, staging, tmp, repeat)
                shutil.rmtree(staging)
                by_size[size] = (save_s, copy_s)
                log(f"  {size / MiB:8.0f} MiB: save() {med(save_s) * 1e3:8.2f} ms, copytree "
                    f"{med(copy_s) * 1e3:9.1f} ms ({med(copy_s) / med(save_s):,.0f}x)")
            for size, (save_s, copy_s) in by_size.items():
                ratio = med(copy_s) / med(save_s)
                judged = size == 1 << 30
                rows.append(Row(
                    f"save() blocking, one file of {_fmt(size)}", med(save_s) * 1e3, "ms",
                    "shutil.copytree", med(copy_s) * 1e3,
                    f">= {GOAL_1GIB:.0f}x faster" if judged else "flat in bytes",
                    ratio >= GOAL_1GIB if judged else None, ratio,
                    note="ratio = copy time / save() time",
                    samples=[x * 1e3 for x in save_s], baseline_samples=[x * 1e3 for x in copy_s],
                    series="size", x=size))
            if len(by_size) > 1:
                smallest, largest = min(by_size), max(by_size)
                grow = med(by_size[largest][0]) / med(by_size[smallest][0])
                rows.append(Row(
                    f"save() blocking growth, {_fmt(smallest)} -> {_fmt(largest)}",
                    med(by_size[largest][0]) * 1e3, "ms", f"save() of {_fmt(smallest)}",
                    med(by_size[smallest][0]) * 1e3, "flat in bytes (report)", None, grow,
                    note=f"bytes grew {largest / smallest:,.0f}x",
                    samples=[x * 1e3 for x in by_size[largest][0]],
                    baseline_samples=[x * 1e3 for x in by_size[smallest][0]]))
            for count in counts:
                staging = os.path.join(tmp, f"count-{count}")
                for i in range(count):
                    sub = os.path.join(staging, f"d{i // 1000:02d}")
                    os.makedirs(sub, exist_ok=True)
                    with open(os.path.join(sub, f"f{i:05d}.bin"), "wb") as f:
                        f.write(os.urandom(100))
                save_s, copy_s = _times(engine, staging, tmp, repeat)
                shutil.rmtree(staging)
                per_file = med(save_s) / count * 1e6
                log(f"  {count:8d} files: save() {med(save_s) * 1e3:8.2f} ms "
                    f"({per_file:.1f} us/file), copytree {med(copy_s) * 1e3:9.1f} ms")
                judged = count >= 1000
                rows.append(Row(
                    f"save() blocking, {count:,} files of 100 B", per_file, "us/file",
                    "shutil.copytree (us/file)", med(copy_s) / count * 1e6,
                    f"<= {GOAL_PER_FILE_US:.0f} us/file" if judged else "report",
                    per_file <= GOAL_PER_FILE_US if judged else None,
                    med(copy_s) / med(save_s), note="ratio = copy time / save() time",
                    samples=[x / count * 1e6 for x in save_s],
                    baseline_samples=[x / count * 1e6 for x in copy_s], series="count", x=count))
        finally:
            engine.close()
    return rows


def _fmt(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1MiB,64MiB,1GiB,4GiB")
    ap.add_argument("--counts", default="1,100,1000,10000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    rows = measure([parse_size(s) for s in args.sizes.split(",")],
                   [int(c) for c in args.counts.split(",")], args.repeat, tmpdir=args.dir)
    for r in rows:
        print(f"{r.benchmark:<44} {r.value:10.2f} {r.unit:<8} baseline {r.baseline:10.2f} "
              f"ratio {r.ratio:8.1f} target {r.target} {r.met}")


if __name__ == "__main__":
    main()
