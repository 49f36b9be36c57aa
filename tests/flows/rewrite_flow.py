"""Rewrites a checkpointed file in place right after each save, while uploads are pending.

Whatever the timing, every committed checkpoint must hold exactly the bytes that were in
the file when its save() was called (recorded in its metadata), and the last one must
be committed.
"""

import os

from metaflow import FlowSpec, checkpoint, current, step

SIZE = 4 << 20


class RewriteFlow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        path = os.path.join(current.checkpoint.directory, "weights.bin")
        for value in range(1, 9):
            with open(path, "wb") as f:  # truncates and rewrites the same inode
                f.write(bytes([value]) * SIZE)
            current.checkpoint.save(metadata={"value": value})
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RewriteFlow()
