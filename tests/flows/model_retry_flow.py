"""A step saves a model and then fails: what it saved is committed before @retry's next
attempt, which saves again and finishes."""

import os
import tempfile

from metaflow import FlowSpec, current, model, retry, step


class ModelRetryFlow(FlowSpec):
    @retry(times=1, minutes_between_retries=0)
    @model
    @step
    def start(self):
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "weights.bin"), "w") as f:
            f.write(f"attempt {current.retry_count}")
        self.m = current.model.save(d, label=f"attempt{current.retry_count}")
        if current.retry_count == 0:
            raise RuntimeError("Bad luck on purpose")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ModelRetryFlow()
