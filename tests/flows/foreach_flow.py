"""Branches with equal foreach values must not share checkpoints: scope is by index."""

import os

from metaflow import FlowSpec, checkpoint, current, retry, step


class ForeachFlow(FlowSpec):
    @step
    def start(self):
        self.items = [7, 7, 7]
        self.next(self.work, foreach="items")

    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def work(self):
        path = os.path.join(current.checkpoint.directory, "who")
        if current.retry_count == 0:
            with open(path, "w") as f:
                f.write(str(self.index))
            current.checkpoint.save()
            raise RuntimeError("fail the first attempt of every branch")
        with open(path) as f:
            print(f"RESULT branch{self.index}={f.read()}")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ForeachFlow()
