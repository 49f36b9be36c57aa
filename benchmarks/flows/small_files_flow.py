"""``save()`` of many small files, timed inside a real task (``python flow.py run``).

SMALL_FILES (default 10000) files of SMALL_BYTES (default 100) bytes are written into
``current.checkpoint.directory``; then, SMALL_REPEAT times, each round with new files:

- ``save()``, timed: what the step is blocked for;
- the floor: one ``os.link`` of each of the same files into an empty directory, timed in
  the same process, the least a snapshot by links could cost here.

Prints ``RESULT save_us=... link_us=...`` (per file) per round for
benchmarks/small_files.py. SMALL_PROFILE=path writes a cProfile of the timed saves there.
"""

import cProfile
import os
import shutil
import tempfile
import time

from metaflow import FlowSpec, checkpoint, current, step

FILES = int(os.environ.get("SMALL_FILES", "10000"))
SIZE = int(os.environ.get("SMALL_BYTES", "100"))
REPEAT = int(os.environ.get("SMALL_REPEAT", "3"))
PROFILE = os.environ.get("SMALL_PROFILE")


def write_files(d):
    for i in range(FILES):
        # New files every round (the old ones unlinked): a save's work, not a rewrite's.
        p = os.path.join(d, f"f{i:05d}.bin")
        if os.path.exists(p):
            os.unlink(p)
        with open(p, "wb") as f:
            f.write(os.urandom(SIZE))


def link_all(d):
    out = tempfile.mkdtemp(dir=os.path.dirname(d), prefix="links-")
    names = sorted(os.listdir(d))
    t0 = time.perf_counter()
    for n in names:
        os.link(os.path.join(d, n), os.path.join(out, n))
    took = time.perf_counter() - t0
    shutil.rmtree(out)
    return took


class SmallFilesFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @checkpoint
    @step
    def train(self):
        d = current.checkpoint.directory
        prof = cProfile.Profile() if PROFILE else None
        for _ in range(REPEAT):
            write_files(d)
            link_s = link_all(d)
            if prof is not None:
                prof.enable()
            t0 = time.perf_counter()
            current.checkpoint.save()
            save_s = time.perf_counter() - t0
            if prof is not None:
                prof.disable()
            print(f"RESULT save_us={save_s / FILES * 1e6:.3f} link_us={link_s / FILES * 1e6:.3f}")
            current.checkpoint.wait()
        if prof is not None:
            prof.dump_stats(PROFILE)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SmallFilesFlow()
