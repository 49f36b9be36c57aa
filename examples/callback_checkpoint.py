"""Checkpoint from a training callback with the `Checkpoint` class, the way framework
integrations do, and resume with `current.checkpoint` on retry.

    pip install . && USERNAME=demo python examples/callback_checkpoint.py run

The callback belongs to the training loop, not to the flow: it never sees `current`.
It saves through `Checkpoint()`, which finds the running task by itself, and `save()`
returns at once while the upload runs behind. The first attempt of `train` fails on
purpose after epoch 6; the retry finds the callback's latest checkpoint in
`current.checkpoint.directory` and trains on from epoch 7. Plain Python, no framework.
"""

import json
import os
import random

from metaflow import Checkpoint, FlowSpec, Parameter, checkpoint, current, retry, step

STATE_FILE = "trainer_state.json"


class Trainer:
    """A tiny training loop with callbacks: linear regression by minibatch SGD."""

    def __init__(self, data, *, lr=0.01, batch_size=32, seed=0, callbacks=()):
        self.data = data
        self.lr = lr
        self.batch_size = batch_size
        self.seed = seed
        self.callbacks = list(callbacks)

    def fit(self, epochs, state=None):
        n_features = len(self.data[0][0])
        state = state or {"epoch": -1, "weights": [0.0] * n_features, "bias": 0.0}
        for cb in self.callbacks:
            cb.on_train_begin(self)
        for epoch in range(state["epoch"] + 1, epochs):
            # Shuffles seeded by epoch: a resumed run sees the batches an uninterrupted
            # one would have.
            order = list(range(len(self.data)))
            random.Random(self.seed * 1000 + epoch).shuffle(order)
            w, b = state["weights"], state["bias"]
            for start in range(0, len(order), self.batch_size):
                batch = [self.data[i] for i in order[start:start + self.batch_size]]
                grad_w, grad_b = [0.0] * n_features, 0.0
                for x, y in batch:
                    err = _predict(w, b, x) - y
                    grad_w = [g + 2 * err * xi / len(batch)
                              for g, xi in zip(grad_w, x, strict=True)]
                    grad_b += 2 * err / len(batch)
                w = [wi - self.lr * g for wi, g in zip(w, grad_w, strict=True)]
                b -= self.lr * grad_b
            loss = sum((_predict(w, b, x) - y) ** 2 for x, y in self.data) / len(self.data)
            state = {"epoch": epoch, "weights": w, "bias": b, "loss": loss}
            print(f"epoch {epoch} loss {loss:.6f}")
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, state)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return state


def _predict(w, b, x):
    return sum(wi * xi for wi, xi in zip(w, x, strict=True)) + b


class Callback:
    def on_train_begin(self, trainer):
        pass

    def on_epoch_end(self, trainer, epoch, state):
        pass

    def on_train_end(self, trainer):
        pass


class MetaflowCheckpointCallback(Callback):
    """Writes the trainer's state each epoch and checkpoints it without blocking.

    Like the callbacks shipped for training frameworks, it needs no handle from the flow:
    `Checkpoint()` attaches to the task it runs in.
    """

    def __init__(self, name="trainer"):
        self.name = name
        self.references = []

    def on_train_begin(self, trainer):
        # init_dir=True gives the Checkpoint a directory of its own, so the callback's
        # files never mix with what the step writes.
        self._checkpoint = Checkpoint(init_dir=True)

    def on_epoch_end(self, trainer, epoch, state):
        path = os.path.join(self._checkpoint.directory, STATE_FILE)
        with open(path, "w") as f:
            json.dump(state, f)
        # A file path: a retry finds the file, under its name, in current.checkpoint.directory.
        self.references.append(self._checkpoint.save(
            path, metadata={"epoch": epoch, "loss": state["loss"]}, name=self.name))


class FailOnce(Callback):
    """Stands in for a crash: raises after epoch `at`."""

    def __init__(self, at):
        self.at = at

    def on_epoch_end(self, trainer, epoch, state):
        if epoch == self.at:
            raise RuntimeError(
                f"Deliberate failure after epoch {epoch} of the first attempt: "
                "@retry resumes from the checkpoint.")


class CallbackCheckpointFlow(FlowSpec):
    epochs = Parameter("epochs", default=15, help="Epochs to train for.")
    fail_at = Parameter(
        "fail-at", default=6,
        help="Epoch after which the first attempt fails on purpose (-1: never).")
    seed = Parameter("seed", default=0, help="Seed for the data and the shuffles.")

    @step
    def start(self):
        # y = 3 x0 - 2 x1 + 0.5 x2 + 1 + noise
        rng = random.Random(self.seed)
        self.data = []
        for _ in range(400):
            x = [rng.gauss(0, 1) for _ in range(3)]
            self.data.append((x, 3 * x[0] - 2 * x[1] + 0.5 * x[2] + 1 + rng.gauss(0, 0.1)))
        self.next(self.train)

    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def train(self):
        state = None
        self.resumed_from = None
        if current.checkpoint.is_loaded:
            with open(os.path.join(current.checkpoint.directory, STATE_FILE)) as f:
                state = json.load(f)
            self.resumed_from = state["epoch"]
            print(f"Resuming at epoch {state['epoch'] + 1} from the checkpoint "
                  f"{current.checkpoint.info['name']!r} of epoch {state['epoch']} "
                  f"(saved by attempt {current.checkpoint.info['attempt']})")

        saver = MetaflowCheckpointCallback()
        callbacks = [saver]
        if current.retry_count == 0 and self.fail_at >= 0:
            callbacks.append(FailOnce(self.fail_at))
        final = Trainer(self.data, seed=self.seed, callbacks=callbacks).fit(self.epochs, state)
        self.loss = final["loss"]
        self.model = {"weights": final["weights"], "bias": final["bias"]}
        # References to this attempt's checkpoints, for a later step or run to load().
        self.checkpoints = saver.references
        self.next(self.end)

    @step
    def end(self):
        if self.resumed_from is None:
            print(f"Trained without a resume; final loss {self.loss:.6f}")
        else:
            print(f"Resumed from epoch {self.resumed_from}; final loss {self.loss:.6f}")


if __name__ == "__main__":
    CallbackCheckpointFlow()
