"""Saves a large file that never changes next to a small one that does, across a retry.

Attempt 0 saves twice (the second save finds the large file unchanged) and fails; attempt 1
resumes from its last checkpoint and saves once more, and that first save of the retry
finds the large file unchanged since the checkpoint it loaded.
"""

import os

from metaflow import FlowSpec, checkpoint, current, retry, step

FROZEN = 512 << 10  # stands in for a frozen base model


def result(key, value):
    print(f"RESULT {key}={value}", flush=True)


def write(path, data):
    # A new file renamed over the old one, as a careful trainer writes.
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


class IncrementalFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def train(self):
        d = current.checkpoint.directory
        if current.retry_count == 0:
            write(os.path.join(d, "frozen.bin"), os.urandom(FROZEN))
            for epoch in (0, 1):
                write(os.path.join(d, "step.txt"), str(epoch).encode())
                current.checkpoint.save(metadata={"epoch": epoch}, wait=True)
            raise RuntimeError("simulated crash after saving")
        result("loaded", current.checkpoint.is_loaded)
        write(os.path.join(d, "step.txt"), b"2")
        ref = current.checkpoint.save(metadata={"epoch": 2}, wait=True)
        result("state", ref.state)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    IncrementalFlow()
