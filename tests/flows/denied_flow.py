"""The store refuses checkpoint writes: wait() must fail fast, and so must the task."""

import os
import time

from metaflow import FlowSpec, checkpoint, current, step


class DeniedFlow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        with open(os.path.join(current.checkpoint.directory, "w.bin"), "wb") as f:
            f.write(b"x" * 1000)
        t0 = time.monotonic()
        ref = current.checkpoint.save()
        try:
            ref.wait()
        except Exception as e:
            print(f"RESULT seconds={time.monotonic() - t0:.3f}")
            print(f"RESULT error={e}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    DeniedFlow()
