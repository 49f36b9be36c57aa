"""Saves a few multipart checkpoints whose bytes follow from their metadata, then ends."""

import os
import random

from metaflow import FlowSpec, checkpoint, current, step

SIZE = (12 << 20) + 12345  # three parts of 5 MiB


def content(seed):
    return random.Random(seed).randbytes(SIZE)


class S3Flow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        d = current.checkpoint.directory
        for seed in range(3):
            # A new file renamed over the old one: never torn, whatever the upload timing.
            with open(os.path.join(d, "weights.tmp"), "wb") as f:
                f.write(content(seed))
            os.replace(os.path.join(d, "weights.tmp"), os.path.join(d, "weights.bin"))
            with open(os.path.join(d, "step.txt"), "w") as f:
                f.write(str(seed))
            current.checkpoint.save(metadata={"seed": seed})
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    S3Flow()
