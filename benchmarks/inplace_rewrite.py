"""What an in-place rewriting training loop costs: checkpoints committed and save() time.

Two loops, in the same run, on the engine with the local backend. Each writes a large
file, calls save(), "trains" briefly and repeats:

- in place: ``open(path, "wb")`` over the same file, as torch.save() and safetensors'
  save_file() do. The engine learns that the file is rewritten in place and freezes it
  with a private copy (a clone where the filesystem has reflinks) from then on;
- os.replace: a new file renamed over the old one, which stays hardlinked (the baseline).

Reported: checkpoints committed out of saves made, each verified against its own bytes;
and how long save() blocked, for the first (linked) save and for the copied ones.

    python benchmarks/inplace_rewrite.py [--size 256MiB] [--saves 12] [--train 0.2] [--dir /p]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time

from uploader import (
    CheckpointKeys,
    CheckpointState,
    Engine,
    LocalBackend,
    SaveRequest,
    Scope,
    Settings,
    TransferContext,
    new_checkpoint_id,
)
from uploader.config import parse_size


def run_loop(tmp: str, size: int, saves: int, train_s: float, *, in_place: bool
             ) -> tuple[int, list[float]]:
    staging = os.path.join(tmp, "staging")
    os.makedirs(staging)
    path = os.path.join(staging, "model.bin")
    scope = Scope("Bench", "user:bench", "train")

    def factory(ctx: TransferContext) -> LocalBackend:
        return LocalBackend(os.path.join(tmp, "store"), ctx)

    engine = Engine(factory, Settings(copy_budget=0), snapshot_dir=os.path.join(tmp, "snap"),
                    log=lambda m: None)
    engine.backend  # noqa: B018  start the uploader before timing, as @checkpoint does
    blocked: list[float] = []
    expected: dict[str, str] = {}
    handles = []
    try:
        for i in range(saves):
            data = bytes([i]) * size
            if in_place:
                with open(path, "wb") as f:
                    f.write(data)
            else:
                with open(path + ".tmp", "wb") as f:
                    f.write(data)
                os.replace(path + ".tmp", path)
            keys = CheckpointKeys(scope.prefix, "1", new_checkpoint_id("1", 0))
            t0 = time.perf_counter()
            handles.append(engine.save(SaveRequest(
                source=staging, keys=keys, name="ck", latest=True, metadata={}, identity={},
                reference={})))
            blocked.append(time.perf_counter() - t0)
            expected[keys.checkpoint_id] = hashlib.sha256(data).hexdigest()
            end = time.perf_counter() + train_s
            while time.perf_counter() < end:
                pass
        engine.drain()
        committed = 0
        for h in handles:
            if h.state is CheckpointState.COMMITTED:
                keys = CheckpointKeys(scope.prefix, "1", h.checkpoint_id)
                m = engine.read_manifest(keys)
                assert m is not None and m.files[0].sha256 == expected[h.checkpoint_id]
                committed += 1
        return committed, blocked
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256MiB")
    ap.add_argument("--saves", type=int, default=12)
    ap.add_argument("--train", type=float, default=0.2, help="seconds of work between saves")
    ap.add_argument("--dir", default=None, help="where to put the files (default: a tempdir)")
    args = ap.parse_args()
    size = parse_size(args.size)
    rows = []
    for label, in_place in (("os.replace (baseline)", False), ("in place", True)):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            committed, blocked = run_loop(tmp, size, args.saves, args.train, in_place=in_place)
        rows.append((label, committed, blocked))
    print(f"{args.saves} saves of a {size / 2**20:.0f} MiB file, {args.train}s of work between")
    print(f"{'loop':24} {'committed':>10} {'first save() ms':>16} {'later save() ms (median)':>25}")
    for label, committed, blocked in rows:
        print(f"{label:24} {committed:>4}/{args.saves:<5} {blocked[0] * 1e3:>16.2f} "
              f"{statistics.median(blocked[1:]) * 1e3:>25.2f}")
    base = statistics.median(rows[0][2][1:])
    copied = statistics.median(rows[1][2][1:])
    print(f"in-place save() blocks {copied / base:.0f}x as long as the os.replace baseline "
          f"({copied * 1e3:.1f} ms vs {base * 1e3:.2f} ms): the price of a private copy")


if __name__ == "__main__":
    main()
