"""Saves a few checkpoints with metadata in two steps, for the `checkpoint` command's tests.

The bytes of each file follow from its epoch (see :func:`content`), so a test can check a
download against what the flow wrote without reading the store itself.
"""

import os
import random

from metaflow import FlowSpec, checkpoint, current, step

EPOCHS = 3
LOSSES = [0.9, 0.4, 0.6]  # the best (smallest) is not the newest


def content(epoch, size=40_000):
    return random.Random(epoch).randbytes(size + epoch)


def write(directory, epoch):
    os.makedirs(os.path.join(directory, "sub"), exist_ok=True)
    with open(os.path.join(directory, "weights.tmp"), "wb") as f:
        f.write(content(epoch))
    os.replace(os.path.join(directory, "weights.tmp"), os.path.join(directory, "weights.bin"))
    with open(os.path.join(directory, "sub", "epoch.txt"), "w") as f:
        f.write(str(epoch))


class CliFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @checkpoint(show_card=False)
    @step
    def train(self):
        d = current.checkpoint.directory
        for epoch in range(EPOCHS):
            write(d, epoch)
            current.checkpoint.save(name="model", wait=True,
                                    metadata={"epoch": epoch, "loss": LOSSES[epoch]})
        self.next(self.evaluate)

    @checkpoint(show_card=False)
    @step
    def evaluate(self):
        write(current.checkpoint.directory, 10)
        current.checkpoint.save(name="report", metadata={"epoch": 10}, wait=True)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CliFlow()
