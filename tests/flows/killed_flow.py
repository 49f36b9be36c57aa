"""A task SIGKILLed mid-loop (as the OOM killer or a lost node would) resumes on retry.

Attempt 0 rewrites a large file in place after every save and "trains" between saves; it
is killed right after its 8th save. Attempt 1 reports which save it resumed from.
"""

import os
import signal

from metaflow import FlowSpec, checkpoint, current, retry, step

SIZE = 64 << 20
KILL_AFTER = 8


def train(seconds):
    # Pure-Python work, holding the GIL as a training step's Python side does.
    end = os.times().elapsed + seconds
    n = 0
    while os.times().elapsed < end:
        n += 1
    return n


class KilledFlow(FlowSpec):
    @checkpoint
    @retry(times=1)
    @step
    def start(self):
        path = os.path.join(current.checkpoint.directory, "weights.bin")
        if current.retry_count > 0:
            with open(path, "rb") as f:
                data = f.read()
            assert data == data[:1] * SIZE, "the loaded checkpoint is torn"
            print("RESULT resumed=%d" % current.checkpoint.info["metadata"]["value"])
            print("RESULT resumed_bytes=%d" % data[0])
            self.next(self.end)
            return
        for value in range(1, KILL_AFTER + 1):
            with open(path, "wb") as f:
                f.write(bytes([value]) * SIZE)
            current.checkpoint.save(metadata={"value": value})
            if value == KILL_AFTER:
                os.kill(os.getpid(), signal.SIGKILL)
            train(0.3)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    KilledFlow()
