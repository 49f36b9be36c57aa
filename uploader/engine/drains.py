"""Waiting for an engine's uploads: the drain at the end of a task, and the one a signal
handler runs, with the report of where every checkpoint stands after either."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

from ..handle import CheckpointHandle, CheckpointState

__all__ = ["DrainProgress", "DrainReport", "drain", "drain_for_signal"]


@dataclasses.dataclass(frozen=True)
class DrainReport:
    """Where every checkpoint of an engine stands after a drain."""

    handles: tuple[CheckpointHandle, ...]

    def _in(self, state: CheckpointState) -> list[CheckpointHandle]:
        return [h for h in self.handles if h.state is state]

    @property
    def committed(self) -> list[CheckpointHandle]:
        return self._in(CheckpointState.COMMITTED)

    @property
    def failed(self) -> list[CheckpointHandle]:
        return self._in(CheckpointState.FAILED)

    @property
    def pending(self) -> list[CheckpointHandle]:
        return [h for h in self.handles if not h.done()]

    @property
    def torn_unsuperseded(self) -> list[CheckpointHandle]:
        """Torn checkpoints that no later committed save of the same name and scope replaced.

        Only like replaces like: a later "last" never stands in for a torn "best".
        """
        out = []
        replaced: set[tuple[str, str]] = set()
        for h in reversed(self.handles):
            if h.state is CheckpointState.COMMITTED:
                replaced.add((h.scope, h.name))
            elif h.state is CheckpointState.TORN and (h.scope, h.name) not in replaced:
                out.append(h)
        out.reverse()
        return out


@dataclasses.dataclass(frozen=True)
class DrainProgress:
    """How far the uploads a drain waits for are, for a progress line."""

    pending: int  # checkpoints not yet final
    bytes_left: int  # of those, bytes neither uploaded nor found unchanged yet
    waited_s: float  # since the drain started


def drain(handles_now: Callable[[], tuple[CheckpointHandle, ...]], limit: float, *,
          every: float, progress: Callable[[DrainProgress], None] | None = None
          ) -> DrainReport:
    """Wait up to ``limit`` seconds (``math.inf``: until every one is done) for the
    handles ``handles_now()`` returns as it starts; report on those it returns at the end.

    ``progress`` is called (in the caller's thread) every ``every`` seconds while uploads
    are still pending.
    """
    start = time.monotonic()
    deadline = start + limit
    next_report = start + every
    handles = handles_now()
    for h in handles:
        while True:
            now = time.monotonic()
            until = deadline if progress is None else min(deadline, next_report)
            if h._done.wait(None if math.isinf(until) else max(0.0, until - now)):
                break
            now = time.monotonic()
            if now >= deadline:
                break
            if progress is not None and now >= next_report:
                pending = [p for p in handles if not p.done()]
                progress(DrainProgress(
                    pending=len(pending), waited_s=now - start,
                    bytes_left=sum(p.stats.bytes_left for p in pending)))
                next_report = time.monotonic() + every
    return DrainReport(handles_now())


def drain_for_signal(handles: tuple[CheckpointHandle, ...], timeout: float) -> DrainReport:
    """Like :func:`drain`, for a signal handler: takes no lock and waits on no event.

    The handler runs on the main thread between two bytecodes of whatever it
    interrupted, which may hold the engine's lock or be inside an event's wait.
    """
    deadline = time.monotonic() + timeout
    # The state, not the event: the event's set() may wait on a lock the interrupted
    # code holds, but the state is final before it. Handles mostly finish in order:
    # each is looked at until it is final, never again after, so polling is linear.
    i = 0
    while True:
        while i < len(handles) and handles[i].state.is_final:
            i += 1
        if i == len(handles) or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    return DrainReport(handles)
