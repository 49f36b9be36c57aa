"""SIGTERM (preemption): commit pending checkpoints within a grace period, then die.

A preempted task gets SIGTERM and, some seconds later, SIGKILL. :func:`install` puts a
handler in place that spends up to ``grace`` seconds committing what was saved, removes
the task's local files, and then ends the process the way the handler it replaced would
have. Two things make that safe:

- The handler runs on the main thread between two bytecodes of whatever it interrupted,
  which may hold any lock: it calls only a ``drain`` that takes none.
- A forked child (a DataLoader worker, a ``multiprocessing`` helper) inherits the handler
  but none of the uploader's threads: there SIGTERM gets its previous disposition back
  right after the fork, and a handler that still runs in a child (a signal that arrived
  before the at-fork hook) acts as the previous one at once. A child never drains or
  removes files: the staging directory it sees is its parent's.

Imports nothing but the standard library, so it can be tested without Metaflow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["install"]

Disposition = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class _Handler:
    """The installed SIGTERM handler of one process (``pid``)."""

    def __init__(self, *, previous: Disposition, drain: Callable[[float], object],
                 grace: float, cleanup: Callable[[], None],
                 log: Callable[[str], None]) -> None:
        # getsignal() says None for a handler not installed from Python: it cannot be
        # restored, so fall back to the default action (the process ends).
        self.previous = signal.SIG_DFL if previous is None else previous
        self.pid = os.getpid()
        self.active = True  # until the task that installed it restores the previous one
        self._drain, self._grace, self._cleanup, self._log = drain, grace, cleanup, log

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if signal.getsignal(signum) is self:
            # Give the signal back first: a second SIGTERM during the drain then acts as
            # the previous handler would (by default: the process ends at once). A handler
            # installed over ours, which calls ours, stays.
            _set(signum, self.previous)
        if os.getpid() != self.pid or not self.active:
            # A forked child (it has nothing of ours to drain), or a handler installed over
            # ours that still calls it after the task ended.
            _act_as(self.previous, signum, frame)
            return
        self._say(f"SIGTERM: committing pending checkpoints (up to {self._grace:g}s, "
                  "METAFLOW_CHECKPOINT_SIGTERM_GRACE)")
        try:
            self._drain(self._grace)
        except Exception as e:
            self._say(f"ERROR while committing checkpoints on SIGTERM: {e}")
        if self.previous == signal.SIG_DFL:
            # The process ends without running the task's own cleanup: remove its local
            # files now. A Python handler may let the process go on, and then they are
            # still needed (the end of the task removes them).
            try:
                self._cleanup()
            except Exception as e:
                self._say(f"ERROR while removing checkpoint files on SIGTERM: {e}")
        _act_as(self.previous, signum, frame)

    def _say(self, msg: str) -> None:
        # The interrupted code may have been writing to the same stream ("reentrant
        # call"); a lost line must not keep the process from ending.
        with contextlib.suppress(OSError, RuntimeError):
            self._log(msg)


def _set(signum: int, disposition: Disposition) -> None:
    # Off the main thread (ValueError) there is nothing to give back from here.
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signum, signal.SIG_DFL if disposition is None else disposition)


def _act_as(disposition: Disposition, signum: int, frame: FrameType | None) -> None:
    if callable(disposition):
        disposition(signum, frame)
    elif disposition == signal.SIG_DFL:
        # Whatever handles the signal now (perhaps one installed over ours) would only
        # call us again: the default action it is.
        _set(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
    # SIG_IGN: nothing happens, as before.


def _resolve(disposition: Disposition) -> Disposition:
    """What ``disposition`` amounts to once every handler of ours is taken out of it."""
    while isinstance(disposition, _Handler):
        disposition = disposition.previous
    return disposition


def _after_fork_in_child() -> None:
    current = signal.getsignal(signal.SIGTERM)
    if isinstance(current, _Handler):
        _set(signal.SIGTERM, _resolve(current))


# At-fork hooks cannot be unregistered: register one, once, that reads the signal's
# current disposition rather than any particular installation.
os.register_at_fork(after_in_child=_after_fork_in_child)


def install(*, drain: Callable[[float], object], grace: float, cleanup: Callable[[], None],
            log: Callable[[str], None]) -> Callable[[], None]:
    """Handle SIGTERM by draining uploads for up to ``grace`` seconds, then dying.

    Parameters
    ----------
    drain : Callable[[float], object]
        Waits up to its argument in seconds for pending uploads. It runs inside a signal
        handler, so it must take no lock the interrupted code may hold.
    grace : float
        Seconds the drain may take (``METAFLOW_CHECKPOINT_SIGTERM_GRACE``).
    cleanup : Callable[[], None]
        Removes the task's local files; called before the process ends by the default
        action of SIGTERM.
    log : Callable[[str], None]
        Where the handler says what it does.

    Returns
    -------
    Callable[[], None]
        Puts the previous handler back, unless another was installed over ours since,
        or this is a forked child.

    Notes
    -----
    After the drain the process does what the previous handler would have done: a Python
    handler is called, the default action ends the process by SIGTERM. A process that
    ignores SIGTERM keeps ignoring it (there is no end to prepare for), and so does one
    whose SIGTERM handling cannot be changed from here (not the main thread).
    """
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or \
            previous == signal.SIG_IGN:
        return lambda: None
    handler = _Handler(previous=previous, drain=drain, grace=grace, cleanup=cleanup, log=log)
    signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        handler.active = False
        if os.getpid() == handler.pid and signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, handler.previous)

    return restore
