"""sys.exit() right after save(): the checkpoint must still be committed (task_finished)."""

import os
import sys

from metaflow import FlowSpec, checkpoint, current, step


class ExitFlow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        with open(os.path.join(current.checkpoint.directory, "big.bin"), "wb") as f:
            f.write(os.urandom(32 << 20))
        current.checkpoint.save(metadata={"why": "exit"})
        if True:  # keeps the graph valid while the step never reaches self.next()
            sys.exit(3)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ExitFlow()
