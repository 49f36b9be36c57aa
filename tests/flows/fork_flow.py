"""Forked children of a @checkpoint step: they save, list and load, and die on SIGTERM."""

import multiprocessing
import os
import shutil
import signal
import tempfile
import time

from metaflow import FlowSpec, checkpoint, current, step


def saver(conn, parent_ref):
    out = {}
    try:
        parent_ref.wait()
        out["parent_wait"] = "returned"
    except Exception as e:
        out["parent_wait"] = f"{type(e).__name__}: {e}"
    src = tempfile.mkdtemp()
    with open(os.path.join(src, "child.txt"), "w") as f:
        f.write(f"saved by {os.getpid()}")
    ref = current.checkpoint.save(src, name="child", metadata={"by": "child"})
    out["child_state"] = ref.state
    out["child_key"] = ref["key"]
    out["child_listed"] = any(r["key"] == ref["key"] for r in current.checkpoint.list())
    dest = current.checkpoint.load(ref, tempfile.mkdtemp())
    with open(os.path.join(dest, "child.txt")) as f:
        out["child_loaded"] = f.read()
    shutil.rmtree(src)
    shutil.rmtree(dest)
    conn.send(out)


def blocked(conn):
    conn.send("ready")
    conn.recv()  # never answered: the parent terminates this worker


class ForkFlow(FlowSpec):
    @checkpoint
    @step
    def start(self):
        with open(os.path.join(current.checkpoint.directory, "big.bin"), "wb") as f:
            f.write(os.urandom(64 << 20))
        parent_ref = current.checkpoint.save(metadata={"by": "parent"})
        ctx = multiprocessing.get_context("fork")

        here, there = ctx.Pipe()
        child = ctx.Process(target=saver, args=(there, parent_ref))
        child.start()
        if here.poll(60):
            for key, value in here.recv().items():
                print(f"RESULT {key}={value}")
        else:
            print("RESULT saver_hung=True")
            child.kill()
        child.join()
        print(f"RESULT saver_exitcode={child.exitcode}")

        # A helper blocked forever, terminated while this task may still be uploading:
        # it must die at once, not spend METAFLOW_CHECKPOINT_SIGTERM_GRACE draining.
        self.big = current.checkpoint.save(metadata={"by": "parent", "n": 2})
        here, there = ctx.Pipe()
        worker = ctx.Process(target=blocked, args=(there,))
        worker.start()
        print(f"RESULT worker_ready={here.poll(60) and here.recv() == 'ready'}")
        print(f"RESULT parent_pending_at_terminate={not self.big.done()}")
        t0 = time.monotonic()
        worker.terminate()
        worker.join(timeout=30)
        print(f"RESULT terminated_exitcode={worker.exitcode}")
        print(f"RESULT terminated_seconds={time.monotonic() - t0:.3f}")
        if worker.exitcode is None:
            worker.kill()
            worker.join()
        print(f"RESULT sigterm_disposition={signal.getsignal(signal.SIGTERM)!r}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ForkFlow()
