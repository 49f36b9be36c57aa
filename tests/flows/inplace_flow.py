"""A training loop that rewrites a large file in place right after every save.

This is what torch.save(), safetensors' save_file() and open(path, "wb") do to a file
that already exists: truncate and rewrite the same inode. Each save records the value
written into the file in its metadata, so a reader can check every committed checkpoint
holds exactly the bytes of its save.
"""

import os
import time

from metaflow import FlowSpec, Parameter, checkpoint, current, step


class InplaceFlow(FlowSpec):
    saves = Parameter("saves", default=12)
    size_mib = Parameter("size_mib", default=64)

    # Tests put the staging directory on a filesystem of their choice.
    @checkpoint(temp_dir_root=os.environ.get("TEST_STAGING_ROOT"))
    @step
    def start(self):
        path = os.path.join(current.checkpoint.directory, "weights.bin")
        size = self.size_mib << 20
        blocked = []
        for value in range(1, self.saves + 1):
            with open(path, "wb") as f:  # truncates and rewrites the same inode
                f.write(bytes([value]) * size)
            t0 = time.perf_counter()
            current.checkpoint.save(metadata={"value": value})
            blocked.append(time.perf_counter() - t0)
        print("RESULT blocked_ms=%s" % ",".join("%.2f" % (b * 1e3) for b in blocked))
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    InplaceFlow()
