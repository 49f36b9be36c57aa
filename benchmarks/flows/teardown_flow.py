"""A step whose checkpoint is committed before it returns, with @checkpoint or without it.

TEARDOWN_CHECKPOINT=1 applies @checkpoint to ``train`` (which then saves once with
``wait=True``, so nothing is pending at the end), with its card if TEARDOWN_CARD=1;
otherwise ``train`` is a plain step.
Prints wall-clock times for benchmarks/teardown.py to read.
"""

import os
import time

from metaflow import FlowSpec, checkpoint, current, step

WITH_CHECKPOINT = os.environ.get("TEARDOWN_CHECKPOINT") == "1"
SHOW_CARD = os.environ.get("TEARDOWN_CARD") == "1"


def maybe_checkpoint(f):
    return checkpoint(show_card=SHOW_CARD)(f) if WITH_CHECKPOINT else f


class TeardownFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @maybe_checkpoint
    @step
    def train(self):
        if WITH_CHECKPOINT:
            with open(os.path.join(current.checkpoint.directory, "state.json"), "w") as f:
                f.write('{"epoch": 1}')
            current.checkpoint.save(wait=True)
        print(f"RESULT body_end={time.time()}")
        self.next(self.end)

    @step
    def end(self):
        print(f"RESULT end_start={time.time()}")


if __name__ == "__main__":
    TeardownFlow()
