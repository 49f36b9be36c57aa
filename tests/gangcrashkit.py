"""What the gang crash harness's flow and its test share: the bytes each rank saves at
each step, and the lock-step barrier the ranks train through.

A rank's checkpoint files at a step are a function of ``(rank, step)`` alone
(:func:`expected`), so a reader can tell, byte for byte, whose part of which step it
holds. The barrier is the collective a real training loop has between two saves: every
rank enters it, and none leaves before all have entered. A rank that dies makes the
others fail, never wait forever: each waiter watches the processes of the ranks it
waits for, and a rank that gives up tells the others (an ``abort`` file).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Mapping

MiB = 1 << 20
CHECKPOINT_NAME = "mfchckpt"


def content(rank: int, step: int) -> dict[str, bytes]:
    """The files rank ``rank`` saves at training step ``step``, by relative path."""
    seed = f"{rank}/{step}"
    big = MiB + (rank * 7919 + step * 104729) % MiB  # 1-2 MiB, different per part
    return {
        "weights.bin": random.Random(seed + "/weights").randbytes(big),
        "opt/moments.bin": random.Random(seed + "/moments").randbytes(48 * 1024 + rank),
        "state.json": json.dumps({"rank": rank, "step": step}).encode(),
    }


def digests(files: Mapping[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def expected(rank: int, step: int) -> dict[str, str]:
    """The sha256 of each file of rank ``rank``'s part of step ``step``."""
    return digests(content(rank, step))


def tree_digests(root: str) -> dict[str, str]:
    """The sha256 of every regular file under ``root``, by path relative to it."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            with open(path, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(out.items()))


def loaded_line(rank: int, step: int | None, owner: int | None, key: str | None,
                files: Mapping[str, str]) -> str:
    """What a rank of the retry prints about what it loaded (see :func:`parse_loaded`)."""
    if step is None:
        return f"LOADED rank={rank} none files={json.dumps(dict(files))}"
    return (f"LOADED rank={rank} step={step} owner={owner} key={key} "
            f"files={json.dumps(dict(files))}")


_LOADED = re.compile(r"LOADED rank=(\d+)((?: none| \w+=\S+)*?) files=(\{[^{}]*\})")


def parse_loaded(text: str) -> dict[int, dict[str, object]]:
    """``rank -> {"step", "owner", "key", "files"}`` from a run's output.

    Found anywhere in the text: the ranks of a local gang share one output stream, and two
    ranks' lines can land on one line of the log.
    """
    out: dict[int, dict[str, object]] = {}
    for m in _LOADED.finditer(text):
        rank = int(m[1])
        fields = dict(f.split("=", 1) for f in m[2].split() if "=" in f)
        assert rank not in out, f"rank {rank} reported twice:\n{text}"
        out[rank] = {"step": int(fields["step"]) if "step" in fields else None,
                     "owner": int(fields["owner"]) if "owner" in fields else None,
                     "key": fields.get("key"), "files": json.loads(m[3])}
    return out


class BarrierBroken(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    # A killed worker stays a zombie until the control task reaps it, which it does only
    # after its own step function returns: a zombie is dead here.
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X")


class Barrier:
    """A file barrier of ``size`` ranks in ``root``, one directory per attempt."""

    def __init__(self, root: str, attempt: int, rank: int, size: int,
                 timeout: float = 60.0) -> None:
        self.dir = os.path.join(root, f"a{attempt}")
        os.makedirs(self.dir, exist_ok=True)
        self.rank, self.size, self.timeout = rank, size, timeout
        self._put(f"pid-{rank}", str(os.getpid()))

    def _put(self, name: str, text: str) -> None:
        tmp = os.path.join(self.dir, f".{name}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.dir, name))

    def _get(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.dir, name)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def abort(self, why: str) -> BarrierBroken:
        if self._get("abort") is None:
            self._put("abort", f"rank {self.rank}: {why}")
        return BarrierBroken(f"rank {self.rank}: {why}")

    def wait(self, tag: str, value: str = "") -> dict[int, str]:
        """Enter the barrier ``tag`` with ``value``; every rank's value once all entered."""
        self._put(f"{tag}-r{self.rank}", value)
        deadline = time.monotonic() + self.timeout
        while True:
            why = self._get("abort")
            if why is not None:
                raise BarrierBroken(f"rank {self.rank} at {tag}: the gang broke ({why})")
            got = {r: self._get(f"{tag}-r{r}") for r in range(self.size)}
            missing = [r for r, v in got.items() if v is None]
            if not missing:
                return {r: v for r, v in got.items() if v is not None}
            for r in missing:
                pid = self._get(f"pid-{r}")
                if pid and not _alive(int(pid)):
                    raise self.abort(f"rank {r} (pid {pid}) died before {tag}")
            if time.monotonic() >= deadline:
                raise self.abort(f"ranks {missing} did not reach {tag} in {self.timeout}s")
            time.sleep(0.005)
