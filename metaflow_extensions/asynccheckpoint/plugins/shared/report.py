"""What the task prints about its checkpoints: one line per commit, and the drain's progress.

The lines are plain functions of the engine's figures, so the wording is tested without a
task; ``current.checkpoint`` prints them through its log (:mod:`.logs`), commit lines in the
order of the saves (:class:`InSaveOrder`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from uploader import CheckpointHandle, DrainProgress
from uploader.config import size_text

__all__ = ["InSaveOrder", "commit_line", "drain_line", "duration_text", "rate_text",
           "size_text"]


def rate_text(bytes_per_s: float) -> str:
    """``183 MiB/s``, ``2.44 MiB/s``, ``12.0 KiB/s``: three significant digits at most."""
    value, unit = bytes_per_s, "B/s"
    for bigger in ("KiB/s", "MiB/s", "GiB/s"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f} {unit}"


def duration_text(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


def _files(n: int) -> str:
    return f"{n} file{'' if n == 1 else 's'}"


def commit_line(handle: CheckpointHandle, *, detail: bool = False) -> str:
    """E.g. ``committed 'mfchckpt' #3: 257.0 MiB, 1.0 MiB uploaded in 410.0 ms`` (the rest
    was unchanged), or ``... #1: 257.0 MiB, all uploaded in 2.10 s``.

    ``detail`` (the debug level) gives every figure: ``committed 'mfchckpt' #3: 257.0 MiB
    in 3 files, 256.0 MiB unchanged (not uploaded); uploaded 1.0 MiB in 410.0 ms (2.44
    MiB/s); save() blocked 1.2 ms``."""
    s = handle.stats
    head = f"committed {handle.name!r}{f' #{handle.number}' if handle.number else ''}: " \
           f"{size_text(s.bytes)}"
    if detail:
        speed = f" ({rate_text(s.throughput)})" if s.throughput else ""
        return (f"{head} in {_files(s.files)}, {size_text(s.bytes_skipped)} unchanged (not "
                f"uploaded); uploaded {size_text(s.bytes_uploaded)} in "
                f"{duration_text(s.upload_s)}{speed}; save() blocked "
                f"{duration_text(s.blocked_s)}")
    sent = "all" if s.bytes_uploaded >= s.bytes else size_text(s.bytes_uploaded)
    return f"{head}, {sent} uploaded in {duration_text(s.upload_s)}"


def drain_line(progress: DrainProgress) -> str:
    """E.g. ``waiting for 2 pending uploads: 300.0 MiB left, 10.0 s so far``."""
    uploads = "upload" if progress.pending == 1 else "uploads"
    return (f"waiting for {progress.pending} pending {uploads}: "
            f"{size_text(progress.bytes_left)} left, {duration_text(progress.waited_s)} so far")


class InSaveOrder:
    """Commit lines in the order of the saves, whatever order their uploads finish in.

    Two uploads run at once, and a small save commits before the big one made before it:
    its line waits until every earlier save of the engine is final (committed, torn or
    failed; a failure says so itself) and then goes out. :meth:`flush` prints whatever
    still waits (the end of the task). ``handles`` gives the engine's saves in save order;
    a forked child's engine starts its own.
    """

    def __init__(self, emit: Callable[[str], None],
                 handles: Callable[[], Sequence[CheckpointHandle]],
                 line: Callable[[CheckpointHandle], str]) -> None:
        self._emit, self._handles, self._line = emit, handles, line
        self._held: list[tuple[CheckpointHandle, str]] = []
        self._lock = threading.Lock()

    def committed(self, handle: CheckpointHandle) -> None:
        """Called as ``handle`` commits (its state may not say so yet)."""
        with self._lock:
            self._held.append((handle, self._line(handle)))
            waiting = next((h for h in self._handles()
                            if h is not handle and not h.state.is_final), None)
            self._release(lambda h: waiting is None or h.number < waiting.number)

    def flush(self, *, blocking: bool = True) -> None:
        """Print every line still waiting. ``blocking=False`` (a signal handler, which may
        have interrupted a holder of the lock) gives up instead of waiting."""
        if self._lock.acquire(blocking=blocking):
            try:
                self._release(lambda h: True)
            finally:
                self._lock.release()

    def _release(self, ready: Callable[[CheckpointHandle], bool]) -> None:
        self._held.sort(key=lambda held: held[0].number)
        while self._held and ready(self._held[0][0]):
            self._emit(self._held.pop(0)[1])
