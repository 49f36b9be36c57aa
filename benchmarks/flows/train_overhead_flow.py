"""A PyTorch training loop that saves its model and optimizer every few steps
(``benchmarks/train_overhead.py`` runs it).

With ``TRAIN_BENCH_CHECKPOINT=1`` the step has ``@checkpoint`` (whichever package provides
it in the interpreter that runs the flow) and each save is ``torch.save`` into
``current.checkpoint.directory`` followed by ``current.checkpoint.save()``. Without it, the
same ``torch.save`` files are written to a temporary directory and nothing else: the
baseline, so the difference is what the checkpointing library adds.

Every step is a real optimizer step, so the weights, and the bytes saved, are new at every
save. Prints ``TRAIN_LOOP <seconds> SAVES <n> BYTES <size> SAVE_CALLS <seconds>
THREAD_CPU <seconds>`` (the last: CPU time of the loop's own thread, which other work on
the machine does not inflate the way it does wall time).
"""

import os
import tempfile
import time

from metaflow import FlowSpec, Parameter, current, step

CHECKPOINT = os.environ.get("TRAIN_BENCH_CHECKPOINT") == "1"

if CHECKPOINT:
    from metaflow import checkpoint
else:
    def checkpoint(f):
        return f


class TrainOverheadFlow(FlowSpec):
    steps = Parameter("steps", default=40, help="optimizer steps")
    every = Parameter("every", default=10, help="save every this many steps")
    width = Parameter("width", default=1024, help="units of each hidden layer")
    layers = Parameter("layers", default=2, help="hidden layers (width x width each)")
    batch = Parameter("batch", default=64, help="rows per batch")

    @step
    def start(self):
        self.next(self.train)

    @checkpoint
    @step
    def train(self):
        import torch
        from torch import nn

        torch.set_num_threads(1)  # the loop on one core; the other is the machine's rest
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(self.width, self.width) for _ in range(self.layers)])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(self.batch, self.width)
        y = torch.randn(self.batch, self.width)
        out = current.checkpoint.directory if CHECKPOINT else tempfile.mkdtemp()
        path = os.path.join(out, "state.pt")
        saves, in_save = 0, 0.0
        t0, c0 = time.perf_counter(), time.thread_time()
        for i in range(1, self.steps + 1):
            optimizer.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            optimizer.step()
            if i % self.every == 0:
                torch.save({"step": i, "model": model.state_dict(),
                            "optimizer": optimizer.state_dict()}, path)
                if CHECKPOINT:
                    s0 = time.perf_counter()
                    current.checkpoint.save(metadata={"step": i})
                    in_save += time.perf_counter() - s0
                saves += 1
        loop, cpu = time.perf_counter() - t0, time.thread_time() - c0
        print(f"TRAIN_LOOP {loop:.4f} SAVES {saves} BYTES {os.path.getsize(path)} "
              f"SAVE_CALLS {in_save:.4f} THREAD_CPU {cpu:.4f}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TrainOverheadFlow()
