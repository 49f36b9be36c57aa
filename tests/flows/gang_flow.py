"""A @parallel gang of 3 ranks with @checkpoint, @model and @retry, in the patterns of
distributed training. ``GANG_MODE`` chooses one:

- ``sharded``: every rank saves its shard every step; rank 1 fails in the first attempt.
- ``diverge``: ranks 0 and 1 commit steps 0-4, rank 2 only 0-2 before it fails: the
  ranks hold different newest steps when the gang fails, and must all resume from 2.
- ``replicated``: only rank 0 saves (as metaflow-checkpoint's DDP example does); every
  rank resumes from rank 0's latest.
"""

import json
import os
import tempfile

from metaflow import FlowSpec, checkpoint, current, model, parallel, retry, step

STEPS = 6


class GangFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train, num_parallel=3)

    @model
    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @parallel
    @step
    def train(self):
        mode = os.environ["GANG_MODE"]
        rank, attempt = current.parallel.node_index, current.retry_count
        path = os.path.join(current.checkpoint.directory, "shard.json")
        first = 0
        if current.checkpoint.is_loaded:
            with open(path) as f:
                state = json.load(f)
            print(f"RESULT loaded{rank}={json.dumps(state)}")
            first = state["step"] + 1
        else:
            print(f"RESULT loaded{rank}=null")
        saves = mode != "replicated" or rank == 0
        for s in range(first, STEPS):
            if saves:
                with open(path, "w") as f:
                    json.dump({"rank": rank, "step": s}, f)
                current.checkpoint.save(metadata={"step": s}, wait=True)
            fail_at = {"sharded": (1, 3), "diverge": (2, 2), "replicated": (1, 3)}[mode]
            if attempt == 0 and (rank, s) == fail_at:
                raise RuntimeError(f"rank {rank} fails on purpose at step {s}")
            if attempt == 0 and mode == "diverge" and rank < 2 and s == 4:
                break
        if attempt == 0:
            # Ranks 0 and 1 (diverge) end their first attempt ahead of rank 2.
            self.next(self.join)
            return
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "weights.bin"), "w") as f:
            f.write(f"rank {rank}")
        self.model_ref = current.model.save(d, label=f"rank{rank}")
        listed = [r["metadata"].get("step") for r in current.checkpoint.list()]
        print(f"RESULT listed{rank}={json.dumps(listed)}")
        self.next(self.join)

    @step
    def join(self, inputs):
        self.models = sorted(i.model_ref["label"] for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        print(f"RESULT models={json.dumps(self.models)}")


if __name__ == "__main__":
    GangFlow()
