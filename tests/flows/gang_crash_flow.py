"""A gang of 3 ranks training in lock-step, one rank SIGKILLed in the first attempt.

Every step each rank writes its shard (bytes that are a function of its rank and the
step, see ``gangcrashkit.content``) into ``current.checkpoint.directory`` and saves it
without waiting, then enters a barrier with the other ranks: the collective between two
saves that real training has. A barrier also opens the loop, as a rendezvous would.

In attempt 0, rank ``GANG_CRASH_RANK`` SIGKILLs itself at step ``GANG_CRASH_STEP``, at
``GANG_CRASH_POINT``:

- ``before_save``: mid-step, with its shard half written and not saved;
- ``after_save``: as ``save()`` returns, its upload in flight;
- ``during_save``: from a thread ``GANG_CRASH_DELAY_MS`` ms after it starts, just before
  ``save()``: in the snapshot, the participant marker, the upload, or just after;
- ``at_write``: in the uploader, just before (odd ``GANG_CRASH_TICK``) or just after (even)
  a write to the store, the ``(GANG_CRASH_TICK + 1) // 2``-th from this step on: the
  participant marker, a file, the manifest that commits the part.

Each step "trains" for ``GANG_CRASH_STEP_MS`` ms before its shard is written.

The other ranks then fail at the next barrier, and ``@retry`` runs attempt 1, where every
rank prints what it loaded (``LOADED ...``) and trains to the end without a crash. Ranks
that loaded different steps fail there, at the barrier that compares them.
``GANG_CRASH_INPLACE=1`` rewrites the shard's files in place (as ``torch.save`` does)
rather than replacing them.
"""

import os
import signal
import sys
import threading
import time

from metaflow import FlowSpec, checkpoint, current, parallel, retry, step

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = int(os.environ.get("GANG_CRASH_STEPS", "4"))


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_store_write(tick):
    """SIGKILL this process at the ``tick``-th edge of a store write: before the first
    write is 1, after it 2, before the second 3..."""
    from uploader import LocalBackend

    count = [0]

    def edge():
        count[0] += 1
        if count[0] == tick:
            die()

    for name in ("put_file", "put_bytes"):
        real = getattr(LocalBackend, name)

        async def wrapped(self, *args, _real=real, **kwargs):
            edge()
            out = await _real(self, *args, **kwargs)
            edge()
            return out

        setattr(LocalBackend, name, wrapped)


def write_shard(directory, files, *, inplace, crash_midway=False):
    for i, (name, data) in enumerate(sorted(files.items())):
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if inplace:
            with open(path, "wb") as f:
                f.write(data)
        else:
            with open(path + ".new", "wb") as f:
                f.write(data)
            os.replace(path + ".new", path)
        if crash_midway and i == 0:
            die()


class GangCrashFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train, num_parallel=3)

    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @parallel
    @step
    def train(self):
        from gangcrashkit import Barrier, content, loaded_line, tree_digests

        rank, size = current.parallel.node_index, current.parallel.num_nodes
        attempt = current.retry_count
        barrier = Barrier(os.environ["GANG_CRASH_BARRIER"], attempt, rank, size)
        directory = current.checkpoint.directory
        first = 0
        if attempt > 0:
            info = current.checkpoint.info
            files = tree_digests(directory)
            if info is None:
                print(loaded_line(rank, None, None, None, files), flush=True)
                loaded = "none"
            else:
                meta = info["metadata"]
                print(loaded_line(rank, meta["step"], meta["rank"], info["key"], files),
                      flush=True)
                loaded = str(meta["step"])
                first = meta["step"] + 1
            seen = barrier.wait("loaded", loaded)
            if len(set(seen.values())) != 1:
                raise RuntimeError(f"rank {rank}: the ranks resumed from different steps: "
                                   f"{seen}")
        crash = attempt == 0 and int(os.environ.get("GANG_CRASH_RANK", "-1")) == rank
        crash_step = int(os.environ.get("GANG_CRASH_STEP", "-1"))
        point = os.environ.get("GANG_CRASH_POINT", "")
        inplace = os.environ.get("GANG_CRASH_INPLACE") == "1"
        step_s = float(os.environ.get("GANG_CRASH_STEP_MS", "0")) / 1000
        barrier.wait("init")
        killer = None
        for s in range(first, STEPS):
            here = crash and s == crash_step
            if here and point == "at_write":
                kill_at_store_write(int(os.environ["GANG_CRASH_TICK"]))
            time.sleep(step_s)
            write_shard(directory, content(rank, s), inplace=inplace,
                        crash_midway=here and point == "before_save")
            if here and point == "during_save":
                delay = float(os.environ["GANG_CRASH_DELAY_MS"]) / 1000

                def later(delay=delay):
                    threading.Event().wait(delay)
                    die()

                killer = threading.Thread(target=later, daemon=True)
                killer.start()
            current.checkpoint.save(metadata={"rank": rank, "step": s})
            if here and point == "after_save":
                die()
            barrier.wait(f"step{s}")
        if killer is not None:
            killer.join()  # a kill planned late in the last step still comes
        print(f"TRAINED rank={rank} attempt={attempt}", flush=True)
        self.next(self.join)

    @step
    def join(self, inputs):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    GangCrashFlow()
