"""Saves racing a writer that rewrites two files in place, as the issue's training loop did.

A thread truncates and rewrites model.pt and optimizer.pt chunk by chunk, version after
version (every byte of version v is v), and pauses every few versions until the step
lets it go on. The step saves as fast as it can while the writer runs, and once in each
pause. Every write is logged with the state it leaves, and every save with the writer's
log positions just before and just after it, to TEST_WRITER_LOG: the test tells from
them whether each committed file is a state the file held while its save() ran.
"""

import json
import os
import threading

from metaflow import FlowSpec, Parameter, checkpoint, current, step

NAMES = ("model.pt", "optimizer.pt")


class Writer(threading.Thread):
    def __init__(self, directory, size, chunk, versions):
        super().__init__(daemon=True)
        self.paths = [os.path.join(directory, n) for n in NAMES]
        self.size, self.chunk, self.versions = size, chunk, versions
        self.lock = threading.Lock()
        self.states = {n: [[0, size]] for n in NAMES}
        self.cond = threading.Condition()
        self.finished = 0
        self.allowed = 0

    def mark(self):
        with self.lock:
            return {n: len(s) - 1 for n, s in self.states.items()}

    def allow(self, version):
        with self.cond:
            self.allowed = version
            self.cond.notify_all()

    def wait_finished(self, version):
        with self.cond:
            if not self.cond.wait_for(lambda: self.finished >= version, 120):
                raise RuntimeError("the writer is stuck")

    def run(self):
        for v in range(1, self.versions + 1):
            with self.cond:
                self.cond.wait_for(lambda v=v: self.allowed >= v)
            for name, path in zip(NAMES, self.paths, strict=True):
                with open(path, "wb", buffering=0) as f:  # truncates: in place
                    with self.lock:
                        self.states[name].append([v, 0])
                    for n in range(self.chunk, self.size + 1, self.chunk):
                        f.write(bytes([v]) * self.chunk)
                        with self.lock:
                            self.states[name].append([v, n])
            with self.cond:
                self.finished = v
                self.cond.notify_all()


class RacingWriterFlow(FlowSpec):
    versions = Parameter("versions", default=16)
    pause_every = Parameter("pause_every", default=4)
    size_kib = Parameter("size_kib", default=1024)
    chunk_kib = Parameter("chunk_kib", default=4)

    @checkpoint
    @step
    def start(self):
        directory = current.checkpoint.directory
        size = self.size_kib << 10
        for name in NAMES:
            with open(os.path.join(directory, name), "wb") as f:
                f.write(bytes([0]) * size)
        writer = Writer(directory, size, self.chunk_kib << 10, self.versions)
        saves = []
        writer.allow(self.pause_every)
        writer.start()
        for v in range(self.pause_every, self.versions + 1, self.pause_every):
            while writer.finished < v:  # racing the writer
                before = writer.mark()
                current.checkpoint.save(metadata={"i": len(saves)})
                saves.append({"before": before, "after": writer.mark()})
            writer.wait_finished(v)
            # In the writer's pause: this one must commit version v of both files.
            current.checkpoint.save(metadata={"paused": v})
            writer.allow(v + self.pause_every)
        writer.join(120)
        current.checkpoint.wait()  # raises if the newest save did not commit
        with open(os.environ["TEST_WRITER_LOG"], "w") as f:
            json.dump({"states": writer.states, "saves": saves, "size": size}, f)
        print("RESULT racing=%d" % len(saves))
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RacingWriterFlow()
