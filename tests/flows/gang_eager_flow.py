"""A @parallel gang with load_policy="eager": a run resumes from the gang checkpoint an
earlier run of the step left. ``GANG_SIZE`` sets num_parallel; ``GANG_SHARDED=0`` makes
only rank 0 save (replicated)."""

import json
import os

from metaflow import FlowSpec, checkpoint, current, parallel, step

SIZE = int(os.environ.get("GANG_SIZE", "3"))
SHARDED = os.environ.get("GANG_SHARDED", "1") == "1"


class GangEagerFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train, num_parallel=SIZE)

    @checkpoint(load_policy="eager")
    @parallel
    @step
    def train(self):
        rank = current.parallel.node_index
        path = os.path.join(current.checkpoint.directory, "shard.json")
        if current.checkpoint.is_loaded:
            with open(path) as f:
                print(f"RESULT loaded{rank}={f.read()}")
        if SHARDED or rank == 0:
            with open(path, "w") as f:
                json.dump({"rank": rank, "size": SIZE}, f)
            current.checkpoint.save()
            current.checkpoint.save()  # a second save: the first of an attempt is not resumed
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    GangEagerFlow()
