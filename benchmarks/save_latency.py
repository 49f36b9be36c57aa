"""How long save() blocks the training loop, against copying the same file.

A checkpoint of one large file (1 GiB by default) is saved with the engine on the local
backend; the time save() takes to return is compared with ``shutil.copy`` of the same
file into the same filesystem, measured in the same run. The time until the checkpoint
is durable (committed, fsynced) is reported too: that work still happens, off the
training thread.

    python benchmarks/save_latency.py [--size 1GiB] [--repeat 5] [--dir /path]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from benchfiles import make_file

from uploader import (
    CheckpointKeys,
    Engine,
    LocalBackend,
    SaveRequest,
    Scope,
    Settings,
    TransferContext,
    new_checkpoint_id,
)
from uploader.config import parse_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to put the files (default: a tempdir)")
    args = ap.parse_args()
    size = parse_size(args.size)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        staging = os.path.join(tmp, "staging")
        os.makedirs(staging)
        src = os.path.join(staging, "model.bin")
        make_file(src, size)
        scope = Scope("Bench", "user:bench", "train")

        def factory(ctx: TransferContext) -> LocalBackend:
            return LocalBackend(os.path.join(tmp, "store"), ctx)

        engine = Engine(factory, Settings(max_pending=1), snapshot_dir=os.path.join(tmp, "snap"),
                        log=print)
        copy_s, save_s, durable_s = [], [], []
        try:
            # @checkpoint starts the uploader's thread when the task starts, before the
            # step's code runs; do the same here so the first save() is not charged for it.
            t0 = time.perf_counter()
            engine.backend  # noqa: B018
            start_s = time.perf_counter() - t0
            for i in range(args.repeat):
                dst = os.path.join(tmp, f"copy-{i}.bin")
                t0 = time.perf_counter()
                shutil.copy(src, dst)
                copy_s.append(time.perf_counter() - t0)
                os.unlink(dst)

                keys = CheckpointKeys(scope.prefix, "1", new_checkpoint_id("1", 0))
                req = SaveRequest(source=staging, keys=keys, name="bench", latest=True,
                                  metadata={}, identity={}, reference={"scope": scope.prefix})
                t0 = time.perf_counter()
                handle = engine.save(req)
                save_s.append(time.perf_counter() - t0)
                handle.wait()
                durable_s.append(time.perf_counter() - t0)
        finally:
            engine.close()

    med = statistics.median
    gib = size / (1 << 30)
    print(f"file size                    {gib:.2f} GiB, {args.repeat} repeats, medians")
    print(f"uploader start (once a task) {start_s * 1e3:10.1f} ms (before the step runs)")
    print(f"shutil.copy (baseline)       {med(copy_s) * 1e3:10.1f} ms")
    print(f"save() returns               {med(save_s) * 1e3:10.2f} ms")
    print(f"save() until durable         {med(durable_s) * 1e3:10.1f} ms (off the caller's thread)")
    print(f"save() / shutil.copy         {med(save_s) / med(copy_s):10.5f}  "
          f"({med(copy_s) / med(save_s):,.0f}x less blocking)")


if __name__ == "__main__":
    main()
