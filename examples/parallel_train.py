"""Train a sharded model on a @parallel gang of ranks, checkpoint each rank's shard, resume.

    pip install '.[torch]' && USERNAME=demo python examples/parallel_train.py run

Locally, @parallel starts the ranks but the first as subprocesses of the `python` found
on PATH: run it with the Python that has the extension and torch first on PATH (in a
virtualenv, activate it).

The `train` step runs on 3 ranks joined by `torch.distributed` (gloo, CPU). The model is
a small MLP whose hidden layer is split across the ranks, as in tensor parallelism: each
rank holds only its slice of the weights and the optimizer state of that slice, and the
ranks add up their parts of the output with an all_reduce at every step. No rank can
save the whole model, so each saves its own shard: in a @parallel step each rank's
`current.checkpoint.save()` is its part of one gang checkpoint, and the k-th save on
every rank belongs to the same one.

The first attempt of rank 1 fails on purpose after the save of step 5, which brings the
other ranks down with it. `@retry` starts the gang again; rank 0 picks the newest gang
checkpoint every rank committed and each rank finds its own shard in
`current.checkpoint.directory`, so training goes on from step 6 with every shard and its
optimizer state as they were. The data is synthetic and made in the flow: nothing is
downloaded.
"""

import os

from metaflow import FlowSpec, Parameter, checkpoint, current, parallel, retry, step


def rendezvous_port(run_id, retry_count):
    """The rendezvous port of an attempt: every rank derives the same one, and each
    attempt has its own, so a retry never meets a socket the failed attempt left behind."""
    import zlib

    # 20000..31999: below the range the kernel hands out to outgoing connections.
    return 20000 + (zlib.crc32(str(run_id).encode()) + retry_count) % 12000


class ParallelTrainFlow(FlowSpec):
    ranks = Parameter("ranks", default=3, help="Ranks in the gang (num_parallel).")
    steps = Parameter("steps", default=10, help="Training steps.")
    fail_at = Parameter(
        "fail-at", default=5,
        help="Step after whose save rank 1 fails in the first attempt (-1: never).")
    seed = Parameter("seed", default=0, help="Seed for the data, the model and the batches.")
    hidden = Parameter("hidden", default=24,
                       help="Hidden units, split evenly across the ranks.")

    @step
    def start(self):
        if self.hidden % self.ranks:
            raise ValueError(f"--hidden {self.hidden} does not split across {self.ranks} ranks")
        self.next(self.train, num_parallel=self.ranks)

    @parallel
    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def train(self):
        import datetime
        import hashlib

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        rank, world = current.parallel.node_index, current.parallel.num_nodes
        port = rendezvous_port(current.run_id, current.retry_count)
        dist.init_process_group(
            "gloo", init_method=f"tcp://{current.parallel.main_ip}:{port}", rank=rank,
            world_size=world, timeout=datetime.timedelta(seconds=120))

        # y = sin(x . w) + noise: the same data on every rank and in every attempt.
        g = torch.Generator().manual_seed(self.seed)
        n, d = 1024, 8
        x = torch.randn(n, d, generator=g)
        y = torch.sin(x @ (torch.randn(d, 1, generator=g) / 2)) + 0.05 * torch.randn(
            n, 1, generator=g)

        # The whole model is drawn from one seed, and each rank keeps only its slice of
        # the hidden layer: the model does not depend on how many ranks share it.
        full_w1 = torch.randn(d, self.hidden, generator=g) / d ** 0.5
        full_b1 = torch.zeros(self.hidden)
        full_w2 = torch.randn(self.hidden, 1, generator=g) / self.hidden ** 0.5
        share = self.hidden // world
        cols = slice(rank * share, (rank + 1) * share)
        shard = {"w1": full_w1[:, cols], "b1": full_b1[cols], "w2": full_w2[cols]}
        shard = {k: torch.nn.Parameter(v.clone()) for k, v in shard.items()}
        optimizer = torch.optim.Adam(shard.values(), lr=0.03)
        path = os.path.join(current.checkpoint.directory, "shard.pt")

        # Every rank reports the step it resumed from (-1: none); all must agree.
        loaded = -1
        if current.checkpoint.is_loaded:
            state = torch.load(path)
            for k, p in shard.items():
                p.data.copy_(state["shard"][k])
            optimizer.load_state_dict(state["optimizer"])
            loaded = state["step"]
            print(f"RESUMED rank={rank} step={loaded} "
                  f"(saved by attempt {current.checkpoint.info['attempt']})")
        steps = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(steps, torch.tensor([loaded]))
        if len({int(s) for s in steps}) != 1:
            raise RuntimeError(f"the ranks resumed from different steps: "
                               f"{[int(s) for s in steps]}")
        self.resumed_from = None if loaded < 0 else loaded

        def forward(xb):
            """The whole model's output; gradients reach only this rank's shard."""
            part = torch.relu(xb @ shard["w1"] + shard["b1"]) @ shard["w2"]
            total = part.detach().clone()
            dist.all_reduce(total)  # the sum of every rank's part
            # The value of the sum, with the gradient of this rank's part.
            return part + (total - part).detach()

        for s in range(loaded + 1, self.steps):
            # Batches seeded by step: a resumed run sees those an uninterrupted one would.
            batch = torch.randperm(n, generator=torch.Generator().manual_seed(
                self.seed * 1000 + s))[:256]
            optimizer.zero_grad()
            loss = torch.mean((forward(x[batch]) - y[batch]) ** 2)
            loss.backward()
            optimizer.step()
            if rank == 0:
                print(f"step {s} loss {loss.item():.6f}")

            # Each rank rewrites its shard and saves it: its part of this step's gang
            # checkpoint. save() returns at once and uploads while the next step trains.
            torch.save({"step": s, "shard": {k: p.detach() for k, p in shard.items()},
                        "optimizer": optimizer.state_dict()}, path)
            current.checkpoint.save(metadata={"step": s, "rank": rank})

            if s == self.fail_at and rank == 1 and current.retry_count == 0:
                raise RuntimeError(
                    f"Deliberate failure of rank 1 after step {s} of the first attempt: "
                    "@retry resumes every rank from its shard of the gang checkpoint.")

        # The whole model, gathered from the shards, on every rank.
        flat = torch.cat([p.detach().flatten() for p in shard.values()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        parts = [torch.split(t, [d * share, share, share]) for t in gathered]
        w1 = torch.cat([p[0].view(d, share) for p in parts], dim=1)
        b1 = torch.cat([p[1] for p in parts])
        w2 = torch.cat([p[2].view(share, 1) for p in parts])
        with torch.no_grad():
            self.loss = torch.mean((torch.relu(x @ w1 + b1) @ w2 - y) ** 2).item()
        digest = hashlib.sha256()
        for t in (w1, b1, w2):
            digest.update(t.contiguous().numpy().tobytes())
        self.checksum = digest.hexdigest()[:16]
        dist.destroy_process_group()
        self.next(self.join)

    @step
    def join(self, inputs):
        results = {(i.loss, i.checksum) for i in inputs}
        if len(results) != 1:
            raise RuntimeError(f"the ranks disagree on the final model: {results}")
        resumed = {i.resumed_from for i in inputs}
        (self.loss, self.checksum), = results
        (self.resumed_from,) = resumed
        self.next(self.end)

    @step
    def end(self):
        if self.resumed_from is None:
            print("Trained without a resume")
        else:
            print(f"Resumed every rank from its shard of step {self.resumed_from}")
        print(f"RESULT loss={self.loss:.6f} checksum={self.checksum}")


if __name__ == "__main__":
    ParallelTrainFlow()
