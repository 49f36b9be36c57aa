"""SIGTERM (as on preemption) right after save(): the checkpoint is committed before exit."""

import os
import signal

from metaflow import FlowSpec, checkpoint, current, step


class SigtermFlow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        with open(os.path.join(current.checkpoint.directory, "big.bin"), "wb") as f:
            f.write(os.urandom(32 << 20))
        current.checkpoint.save(metadata={"why": "sigterm"})
        os.kill(os.getpid(), signal.SIGTERM)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SigtermFlow()
