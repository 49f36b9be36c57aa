"""One save order for a task, shared by every process it starts.

A task saves from its own process and from the processes it starts (``torchrun``
workers, a ``subprocess``), all on one host for the length of an attempt. Their saves are
ordered by one counter kept in a small file that each of them opens: ``fcntl.flock``
makes each increment atomic across processes, so the n-th save on the host gets the
number n, however many processes made the saves before it and whatever their clocks say.

The same file counts the saves of each name. In a gang (see :mod:`uploader.gang`), the
k-th save of a name on every rank is the rank's part of the same training step: ranks
that save in lock-step agree on k with no clock and no message between them.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading

__all__ = ["SaveSequence"]


class SaveSequence:
    """The save counter of one task attempt: in the file at ``path``, or, without one,
    of this process alone (a standalone engine, a test)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._state: dict[str, object] = {"seq": 0, "names": {}}

    def next(self, name: str) -> tuple[int, int]:
        """The number of this save in the attempt (from 0), and how many saves of ``name``
        came before it."""
        with self._lock:
            if self.path is None:
                return self._step(self._state, name)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                raw = os.read(fd, 1 << 20)
                try:
                    state = json.loads(raw) if raw else {"seq": 0, "names": {}}
                except ValueError:
                    # Never a save that fails for its counter (a full disk mid-write).
                    state = {"seq": 0, "names": {}}
                got = self._step(state, name)
                # One write over the old bytes, never a truncate first: a process killed
                # here leaves the old state or the new one (JSON allows trailing spaces).
                data = json.dumps(state).encode()
                os.pwrite(fd, data.ljust(len(raw)), 0)
                return got
            finally:
                os.close(fd)  # releases the lock

    @staticmethod
    def _step(state: dict[str, object], name: str) -> tuple[int, int]:
        seq = int(state.get("seq", 0))  # type: ignore[call-overload]
        names = state.setdefault("names", {})
        assert isinstance(names, dict)
        nth = int(names.get(name, 0))
        state["seq"] = seq + 1
        names[name] = nth + 1
        return seq, nth
