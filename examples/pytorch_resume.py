"""Train a small PyTorch model, checkpoint every epoch, survive a crash with @retry.

    pip install '.[torch]' && USERNAME=demo python examples/pytorch_resume.py run

The first attempt of `train` fails on purpose after epoch 3; `@retry` starts a second
attempt, `@checkpoint` loads the latest checkpoint into `current.checkpoint.directory`
before the step starts, and training goes on from epoch 4 with the model and optimizer
exactly as they were. The data is synthetic and made in the flow: nothing is downloaded.
"""

import os

from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step


class PyTorchResumeFlow(FlowSpec):
    epochs = Parameter("epochs", default=8, help="Epochs to train for.")
    fail_at = Parameter(
        "fail-at", default=3,
        help="Epoch after which the first attempt fails on purpose (-1: never).")
    seed = Parameter("seed", default=0, help="Seed for the data, the model and the shuffles.")

    @step
    def start(self):
        self.next(self.train)

    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def train(self):
        import torch
        from torch import nn

        # A small model on two cores: more threads only add contention.
        torch.set_num_threads(1)
        torch.manual_seed(self.seed)

        # y = sin(x . w) + noise, the same in every attempt.
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(2048, 16, generator=g)
        w = torch.randn(16, 1, generator=g) / 4
        y = torch.sin(x @ w) + 0.05 * torch.randn(2048, 1, generator=g)

        model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        path = os.path.join(current.checkpoint.directory, "state.pt")

        self.resumed_from = None
        start_epoch = 0
        if current.checkpoint.is_loaded:
            state = torch.load(path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            self.resumed_from = state["epoch"]
            start_epoch = state["epoch"] + 1
            print(f"Resuming at epoch {start_epoch} from the checkpoint of epoch "
                  f"{state['epoch']} (saved by attempt {current.checkpoint.info['attempt']})")

        loss_fn = nn.MSELoss()
        for epoch in range(start_epoch, self.epochs):
            # Shuffles seeded by epoch: a resumed run sees the batches an uninterrupted
            # one would have.
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(
                self.seed * 1000 + epoch))
            total = 0.0
            for batch in order.split(128):
                optimizer.zero_grad()
                loss = loss_fn(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            self.loss = total / len(x)
            print(f"epoch {epoch} loss {self.loss:.6f}")

            # torch.save rewrites state.pt in place each epoch; save() returns at once
            # and uploads in the background while the next epoch trains.
            torch.save({"epoch": epoch, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict()}, path)
            current.checkpoint.save(metadata={"epoch": epoch, "loss": self.loss})

            if epoch == self.fail_at and current.retry_count == 0:
                raise RuntimeError(
                    f"Deliberate failure after epoch {epoch} of the first attempt: "
                    "@retry resumes from the checkpoint.")
        self.next(self.end)

    @step
    def end(self):
        if self.resumed_from is None:
            print(f"Trained without a resume; final loss {self.loss:.6f}")
        else:
            print(f"Resumed from epoch {self.resumed_from}; final loss {self.loss:.6f}")


if __name__ == "__main__":
    PyTorchResumeFlow()
