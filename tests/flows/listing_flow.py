"""Listing as metaflow-checkpoint users list: right after save(), from every foreach
branch, and a retried task's checkpoints from a later step."""

import json
import os

from metaflow import Checkpoint, FlowSpec, checkpoint, current, retry, step


class ListingFlow(FlowSpec):
    @step
    def start(self):
        self.branches = ["a", "b"]
        self.next(self.train, foreach="branches")

    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def train(self):
        seen = []
        for epoch in range(6):
            with open(os.path.join(current.checkpoint.directory, "epoch.txt"), "w") as f:
                f.write(str(epoch))
            ref = current.checkpoint.save(metadata={"epoch": epoch, "attempt":
                                                    current.retry_count})
            listed = current.checkpoint.list()
            # "Did it save?": the save just made is the first one listed.
            seen.append([listed[0]["key"] == ref["key"], len(listed)])
        print(f"RESULT seen_{self.input}_{current.retry_count}={json.dumps(seen)}")
        self.train_task = current.pathspec
        if current.retry_count == 0:
            raise RuntimeError("fail the first attempt")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.tasks = [i.train_task for i in inputs]
        self.next(self.end)

    @step
    def end(self):
        cp = Checkpoint()
        latest = [r["metadata"]["attempt"] for r in cp.list(task=self.tasks[0])]
        first = [r["metadata"]["attempt"] for r in cp.list(task=self.tasks[0], attempt=0)]
        every = cp.list(task=self.tasks[0], attempt="all")
        print(f"RESULT latest={json.dumps(latest)}")
        print(f"RESULT first={json.dumps(first)}")
        print(f"RESULT every={len(every)}")


if __name__ == "__main__":
    ListingFlow()
