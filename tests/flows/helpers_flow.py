"""A task whose checkpoints are all saved by processes it starts, one after another:
helper 1 saves epochs 0-2, helper 2 epoch 3, then the attempt fails. ``HELPERS_KEEP``
sets keep_last (unset: keep all)."""

import json
import os
import subprocess
import sys

from metaflow import FlowSpec, checkpoint, current, retry, step

KEEP = int(os.environ.get("HELPERS_KEEP", "0")) or None

HELPER = """
import json, os, sys, tempfile
from metaflow import Checkpoint
for epoch in json.loads(sys.argv[1]):
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "epoch.txt"), "w") as f:
        f.write(str(epoch))
    Checkpoint().save(d, metadata={"epoch": epoch})
"""


def helper(epochs):
    subprocess.run([sys.executable, "-c", HELPER, json.dumps(epochs)], check=True)


class HelpersFlow(FlowSpec):
    @checkpoint(keep_last=KEEP)
    @retry(times=1, minutes_between_retries=0)
    @step
    def start(self):
        if current.retry_count == 0:
            helper([0, 1, 2])
            helper([3])
            raise RuntimeError("fail after the helpers saved")
        with open(os.path.join(current.checkpoint.directory, "epoch.txt")) as f:
            print(f"RESULT loaded={f.read()}")
        listed = [r["metadata"]["epoch"] for r in current.checkpoint.list()]
        print(f"RESULT listed={json.dumps(listed)}")
        helper([4])
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    HelpersFlow()
