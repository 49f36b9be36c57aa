"""A step whose upload worker process (or the task itself) the test kills or stops.

``WORKER_FLOW_MODE`` says what attempt 0 does once it printed ``TASKPID <pid>``:

- ``wait``: saves a multipart checkpoint and waits for it (the test kills the worker
  mid-upload); the step must still succeed.
- ``gate``: saves once and waits for it (a worker now runs), prints ``TASKPID``, then blocks
  on the FIFO ``WORKER_FLOW_GATE`` until the test opened and closed it (having stopped the
  worker), then saves again and waits for that.
- ``die``: starts a multipart save and blocks for good (the test SIGKILLs the task); attempt
  1 saves a small checkpoint and ends.
"""

import os
import random
import threading

from metaflow import FlowSpec, checkpoint, current, retry, step

SIZE = (10 << 20) + 4321  # three parts: two of 5 MiB, and 4,321 bytes


def content(seed):
    return random.Random(seed).randbytes(SIZE)


def write(path, data):
    # A new file renamed over the old one: never torn, whatever the upload timing.
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


class WorkerFlow(FlowSpec):
    @checkpoint
    @retry(times=1)
    @step
    def start(self):
        mode = os.environ["WORKER_FLOW_MODE"]
        weights = os.path.join(current.checkpoint.directory, "weights.bin")
        if current.retry_count > 0:
            write(weights, b"small")
            current.checkpoint.save(metadata={"seed": -1}, wait=True)
            print("RESULT attempt=%d" % current.retry_count, flush=True)
        elif mode == "gate":
            write(weights, content(1))
            current.checkpoint.save(metadata={"seed": 1}, wait=True)
            print("TASKPID %d" % os.getpid(), flush=True)
            with open(os.environ["WORKER_FLOW_GATE"]) as gate:
                gate.read()
            write(weights, content(2))
            current.checkpoint.save(metadata={"seed": 2}, wait=True)
        else:
            write(weights, content(1))
            print("TASKPID %d" % os.getpid(), flush=True)
            current.checkpoint.save(metadata={"seed": 1}, wait=mode == "wait")
            if mode == "die":
                threading.Event().wait()  # until killed
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    WorkerFlow()
