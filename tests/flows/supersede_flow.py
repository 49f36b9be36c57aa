"""A torn "best" checkpoint is not replaced by a later save of another name.

The step keeps the reference of its "best" save as an artifact, then rewrites that file
in place while the upload is pending, and saves "last" from another directory.
"""

import os
import tempfile

from metaflow import FlowSpec, checkpoint, current, step

SIZE = 64 << 20


class SupersedeFlow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        path = os.path.join(current.checkpoint.directory, "model.bin")
        with open(path, "wb") as f:
            f.write(b"B" * SIZE)
        self.best = current.checkpoint.save(name="best")
        with open(path, "wb") as f:  # in place, while "best" is uploading
            f.write(b"C" * SIZE)
        other = tempfile.mkdtemp()
        with open(os.path.join(other, "model.bin"), "wb") as f:
            f.write(b"L" * SIZE)
        self.last = current.checkpoint.save(other, name="last", wait=True)
        try:
            self.best.wait()
            print("RESULT best=committed")
        except Exception as e:
            print("RESULT best=%s" % type(e).__name__)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SupersedeFlow()
