"""Attempt 0 commits two checkpoints, then corrupts the newest in the store and fails.

Attempt 1 must start anyway, say loudly that the newest could not be loaded, and resume
from the older one, odd file names included.
"""

import os

from metaflow import FlowSpec, checkpoint, current, retry, step


def result(key, value):
    print(f"RESULT {key}={value}")


class FallbackFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def train(self):
        d = current.checkpoint.directory
        if current.retry_count == 0:
            with open(os.path.join(d, "state.txt"), "w") as f:
                f.write("epoch=1")
            # Names load() once refused, bricking every later attempt.
            with open(os.path.join(d, "back\\slash.txt"), "w") as f:
                f.write("kept")
            with open(os.path.join(d, "x" * 255), "w") as f:
                f.write("long")
            current.checkpoint.save(wait=True)
            with open(os.path.join(d, "state.txt"), "w") as f:
                f.write("epoch=2")
            newest = current.checkpoint.save(wait=True)
            # One flipped byte in the stored copy of the newest checkpoint.
            stored = os.path.join(newest["url"], "state.txt")
            with open(stored, "r+b") as f:
                first = f.read(1)
                f.seek(0)
                f.write(bytes([first[0] ^ 1]))
            raise RuntimeError("simulated crash after saving")
        result("loaded", current.checkpoint.is_loaded)
        with open(os.path.join(d, "state.txt")) as f:
            result("content", f.read())
        with open(os.path.join(d, "back\\slash.txt")) as f:
            result("backslash", f.read())
        result("files", sorted(os.listdir(d)) == sorted(["state.txt", "back\\slash.txt",
                                                           "x" * 255]))
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FallbackFlow()
