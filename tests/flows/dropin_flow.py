"""What metaflow-checkpoint users do, unchanged: the Checkpoint class from a callback and
from a worker process, the reference's fields, info, and loading a fresh reference."""

import datetime
import json
import os
import subprocess
import sys

from metaflow import Checkpoint, FlowSpec, checkpoint, current, retry, step

WORKER = """
import os, sys
from metaflow import Checkpoint
with Checkpoint() as cp:
    with open(os.path.join(cp.directory, "worker.txt"), "w") as f:
        f.write("from pid %d" % os.getpid())
    ref = cp.save(metadata={"by": "worker"}, name="worker")
print("WORKER saved", ref["key"], flush=True)
"""


class EpochCallback:
    """A framework-style callback: no access to `current`, saves through Checkpoint."""

    def __init__(self, directory):
        self.directory = directory
        self.refs = []

    def on_epoch_end(self, epoch):
        with open(os.path.join(self.directory, "epoch.txt"), "w") as f:
            f.write(str(epoch))
        self.refs.append(Checkpoint().save(self.directory, metadata={"epoch": epoch}))


class DropinFlow(FlowSpec):
    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def start(self):
        cp = current.checkpoint
        if current.retry_count == 0:
            # A worker process saves for the task first; the callback's saves come after it,
            # so its last one is the newest, and what the retry resumes from.
            proc = subprocess.run([sys.executable, "-c", WORKER], capture_output=True,
                                  text=True, check=True)
            print(proc.stdout.strip())
            cb = EpochCallback(cp.directory)
            for epoch in range(3):
                cb.on_epoch_end(epoch)
            ref = cb.refs[-1]
            print("RESULT keys=%s" % json.dumps(sorted(ref)))
            print("RESULT size_at_save=%s" % ref["size"])
            created = datetime.datetime.fromisoformat(ref["created_on"])
            print("RESULT created_naive=%s" % (created.tzinfo is None))
            # Loading a reference saved moments ago waits for its commit.
            loaded = cp.load(ref, os.path.join(cp.directory, "..", "reload-%d" % os.getpid()))
            with open(os.path.join(loaded, "epoch.txt")) as f:
                print("RESULT reloaded=%s" % f.read())
            names = sorted({r["name"] for r in Checkpoint().list()})
            print("RESULT listed=%s" % ",".join(names))
            try:
                cp.save(os.path.join(cp.directory, "missing"))
            except FileNotFoundError as e:
                print("RESULT missing=%s" % isinstance(e, FileNotFoundError))
            raise RuntimeError("fail the first attempt: the retry resumes")
        print("RESULT info_epoch=%s" % cp.info.to_dict()["metadata"]["epoch"])
        print("RESULT is_loaded=%s" % cp.is_loaded)
        print("RESULT task_identifier=%s" % cp.task_identifier)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    DropinFlow()
