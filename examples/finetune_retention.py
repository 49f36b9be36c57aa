"""Fine-tuning an adapter next to a frozen base model: storage that stays in check.

Every epoch saves a checkpoint of the whole directory: the frozen "base model" (64 MiB
by default, never changed), a small "adapter" that training changes, and a JSON of
metrics. Unchanged files are not uploaded again (each commit's log line says how much
was skipped), and retention keeps the 3 newest checkpoints and the 2 with the lowest
validation loss; the rest are deleted in the background. The first attempt fails on
purpose midway; the retry resumes from the newest checkpoint, and its first save already
skips the base it loaded.

    USERNAME=demo python examples/finetune_retention.py run
    USERNAME=demo python examples/finetune_retention.py checkpoint list
"""

import json
import os
import random

from metaflow import Checkpoint, FlowSpec, Parameter, checkpoint, current, retry, step


class FinetuneRetentionFlow(FlowSpec):
    epochs = Parameter("epochs", default=12, help="epochs to train")
    base_mib = Parameter("base-mib", default=64, help="size of the frozen base model, MiB")
    fail_at = Parameter("fail-at", default=7, help="epoch the first attempt fails at; -1: never")

    @step
    def start(self):
        self.next(self.finetune)

    @checkpoint(keep_last=3, keep_best=2, best_metric="val_loss", best_mode="min")
    @retry(times=1)
    @step
    def finetune(self):
        d = current.checkpoint.directory
        base, adapter, metrics = (os.path.join(d, n) for n in
                                  ("base.bin", "adapter.bin", "metrics.json"))
        if current.checkpoint.is_loaded:
            with open(metrics) as f:
                start = json.load(f)["epoch"] + 1
            print(f"Resumed at epoch {start} from {current.checkpoint.info.pathspec}")
        else:
            start = 0
            rng = random.Random(0)
            with open(base, "wb") as f:  # the frozen base: written once, never changed
                for _ in range(self.base_mib):
                    f.write(rng.randbytes(1 << 20))
        for epoch in range(start, self.epochs):
            if epoch == self.fail_at and current.retry_count == 0:
                raise RuntimeError(f"failing on purpose at epoch {epoch}; @retry resumes")
            # The "training": a new adapter each epoch, and a validation loss that is
            # best early on, so the best checkpoints are not the newest ones.
            with open(adapter + ".tmp", "wb") as f:
                f.write(random.Random(epoch).randbytes(256 << 10))
            os.replace(adapter + ".tmp", adapter)
            val_loss = round(1.0 / (1 + epoch) + (0.5 if epoch > 4 else 0.0), 4)
            with open(metrics, "w") as f:
                json.dump({"epoch": epoch, "val_loss": val_loss}, f)
            self.latest = current.checkpoint.save(
                metadata={"epoch": epoch, "val_loss": val_loss})
        self.trained_in = current.pathspec
        self.next(self.end)

    @step
    def end(self):
        # The end of the finetune task waited for its uploads and its last prune. list(task=)
        # lists the latest attempt by default, as metaflow-checkpoint does; this wants both.
        kept = Checkpoint().list(task=self.trained_in, attempt="all")
        epochs = sorted(c["metadata"]["epoch"] for c in kept)
        print(f"Kept checkpoints of epochs {epochs}")


if __name__ == "__main__":
    FinetuneRetentionFlow()
