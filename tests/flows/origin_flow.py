"""Written as metaflow-checkpoint users write it: `resume` after a failure, and runs of
one experiment (`run --tag checkpoint:<name>`) resuming from each other with eager.

``ORIGIN_FAIL=train`` fails the train step after its save (resume then runs it again);
``ORIGIN_FAIL=evaluate`` fails the step after it (resume clones train).
"""

import os

from metaflow import Checkpoint, FlowSpec, Run, checkpoint, current, step

FAIL = os.environ.get("ORIGIN_FAIL", "")


class OriginFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @checkpoint(load_policy="eager")
    @step
    def train(self):
        path = os.path.join(current.checkpoint.directory, "state.txt")
        loaded = None
        if current.checkpoint.is_loaded:
            with open(path) as f:
                loaded = f.read()
        print(f"RESULT loaded_{current.run_id}={loaded}")
        with open(path, "w") as f:
            f.write(f"saved by {current.run_id}")
        current.checkpoint.save()
        if FAIL == "train" and current.origin_run_id is None:
            raise RuntimeError("train fails in the first run")
        self.next(self.evaluate)

    @step
    def evaluate(self):
        if FAIL == "evaluate" and current.origin_run_id is None:
            raise RuntimeError("evaluate fails in the first run")
        train = Run(f"{current.flow_name}/{current.run_id}")["train"].task
        listed = Checkpoint().list(task=train)
        print(f"RESULT listed={len(listed)}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    OriginFlow()
