"""Checkpoints that share an unchanged file, over runs, for the `checkpoint prune` tests.

Each run's ``train`` saves epochs 0-2 with ``latest=True`` and then a copy of the best with
``latest=False``: the newest checkpoint is not the one a retry resumes from. The large
file is written once; every later save finds it unchanged and points at the object stored
first. A second run resumes (``eager``) from the first run's checkpoint, so its saves
point at the first run's object.
"""

import os

from metaflow import FlowSpec, checkpoint, current, step

SHARED = 64 << 10


def write(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


class CliShareFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @checkpoint(load_policy="eager", show_card=False)
    @step
    def train(self):
        d = current.checkpoint.directory
        shared = os.path.join(d, "shared.bin")
        print(f"RESULT loaded={current.checkpoint.is_loaded}", flush=True)
        if not os.path.exists(shared):
            write(shared, os.urandom(SHARED))
        for epoch in range(3):
            write(os.path.join(d, "epoch.txt"), str(epoch).encode())
            current.checkpoint.save(name="model", metadata={"epoch": epoch}, wait=True)
        current.checkpoint.save(name="best", metadata={"epoch": 3}, latest=False, wait=True)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    CliShareFlow()
