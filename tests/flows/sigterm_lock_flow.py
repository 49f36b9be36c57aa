"""SIGTERM while the engine's lock is held: the handler must not wait for that lock."""

import os
import signal

from metaflow import FlowSpec, checkpoint, current, step


class SigtermLockFlow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        with open(os.path.join(current.checkpoint.directory, "state.bin"), "wb") as f:
            f.write(os.urandom(8 << 20))
        current.checkpoint.save(metadata={"why": "sigterm-under-lock"})
        print(f"RESULT staging={current.checkpoint.directory}")
        print(f"RESULT snapshots={current.checkpoint._snapshot_dir}")
        # As when preemption lands while the main thread is inside the engine (starting
        # the uploader, queuing a save): the handler runs with the lock held here.
        with current.checkpoint._engine._lock:
            os.kill(os.getpid(), signal.SIGTERM)
            print("RESULT survived=True")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SigtermLockFlow()
