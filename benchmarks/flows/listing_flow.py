"""``current.checkpoint.list()`` of many checkpoints, timed inside a real task.

The step saves LISTING_CHECKPOINTS (default 1000) checkpoints of one small file (new
bytes each), waits for them, then times ``list()`` LISTING_REPEAT times. The store is
whatever the flow runs with (benchmarks/listing.py points it at the in-memory S3
endpoint with a latency per request). LISTING_PROFILE=path writes a cProfile of the
timed listings there. Prints ``RESULT list_s=...`` per listing.
"""

import cProfile
import json
import os
import time

from metaflow import FlowSpec, checkpoint, current, step

COUNT = int(os.environ.get("LISTING_CHECKPOINTS", "1000"))
REPEAT = int(os.environ.get("LISTING_REPEAT", "3"))
PROFILE = os.environ.get("LISTING_PROFILE")


class ListingFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @checkpoint
    @step
    def train(self):
        path = os.path.join(current.checkpoint.directory, "step.json")
        t0 = time.perf_counter()
        for i in range(COUNT):
            with open(path, "w") as f:
                json.dump({"step": i}, f)
            current.checkpoint.save(metadata={"i": i})
        current.checkpoint.wait()
        print(f"RESULT saved_s={time.perf_counter() - t0:.3f}")
        prof = cProfile.Profile() if PROFILE else None
        for _ in range(REPEAT):
            if prof is not None:
                prof.enable()
            t0 = time.perf_counter()
            got = current.checkpoint.list()
            took = time.perf_counter() - t0
            if prof is not None:
                prof.disable()
            assert len(got) == COUNT, len(got)
            print(f"RESULT list_s={took:.4f}")
        if prof is not None:
            prof.dump_stats(PROFILE)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ListingFlow()
