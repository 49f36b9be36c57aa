"""What a filesystem's timestamps can prove about a file that did not change.

A snapshot proves a frozen file whole by comparing fingerprints (inode, size, mtime,
ctime) taken before and after freezing it: a write in between moves mtime. That holds
only where every write gets a timestamp the file did not already have. Where timestamps
are coarse (ext4 with 128-byte inodes keeps whole seconds; kernels before 6.13 one clock
tick; some network and FUSE filesystems), a write in the same granule as the file's last
change leaves mtime as it was. So a file whose mtime is in the granule that is still
running is *unsettled*: nothing a stat shows can rule out a write that is still to come
in that granule. :class:`Clock` tells such files apart and waits, within a bound, until
the filesystem's clock has moved past them; from then on any write is seen.

The filesystem's own clock decides, read through the ctime of a probe file in the
snapshot directory: on a network filesystem the server's clock stamps files.
"""

from __future__ import annotations

import os
import time
import uuid

__all__ = ["Clock", "timestamp_granularity"]

_SECOND_NS = 1_000_000_000
# The longest one snapshot waits, in all, for a coarse timestamp's granule to pass. A
# granule is at most a second on the filesystems we know; a longer wait means a clock
# that does not move the way it should, and then what could not be proven is torn.
MAX_WAIT_S = 2.0
_granularity: dict[tuple[int, int], int] = {}


def _probe_ctime(fd: int) -> int:
    os.pwrite(fd, b"t", 0)
    return os.fstat(fd).st_ctime_ns


def timestamp_granularity(directory: str) -> int:
    """The step, in ns, of the timestamps a write gets on ``directory``'s filesystem.

    0 means fine: a write right after a ``stat`` always gets a new timestamp (as with
    the multigrain timestamps of Linux 6.13+). Measured once per filesystem with a probe
    file: four write+fstat pairs that all change ctime mean fine; whole-second values
    mean one second; otherwise the step between two observed changes (a clock tick).
    """
    # The filesystem id as well as the device: a loop device's number is reused by the
    # next image mounted on it, which may keep coarser timestamps.
    dev = (os.stat(directory).st_dev, os.statvfs(directory).f_fsid)
    known = _granularity.get(dev)
    if known is not None:
        return known
    path = os.path.join(directory, f".granularity-probe-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        prev = _probe_ctime(fd)
        changes = 0
        for _ in range(4):
            now = _probe_ctime(fd)
            changes += now != prev
            prev = now
        if changes == 4:
            gran = 0
        elif prev % _SECOND_NS == 0:
            gran = _SECOND_NS
        else:
            gran = _SECOND_NS
            first: int | None = None
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                now = _probe_ctime(fd)
                if now != prev:
                    if first is not None:
                        gran = now - first
                        break
                    first = now
                prev = now
                time.sleep(0.0002)
    finally:
        os.close(fd)
        os.unlink(path)
    _granularity[dev] = gran
    return gran


class Clock:
    """The timestamp clock of the filesystem a snapshot is taken on, for one snapshot.

    Made before the walk: :attr:`start` is the timestamp a write got then. A file the walk
    saw with an older mtime is settled (any later write gets a timestamp of at least
    ``start``); one with ``start`` or newer is not, until :meth:`settle` has waited for
    the clock to pass it. All waits of one snapshot share one bound, :data:`MAX_WAIT_S`.
    On a filesystem with fine timestamps every file is settled and nothing is probed.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        st = os.stat(directory)
        self.dev = st.st_dev
        self.granularity = timestamp_granularity(directory)
        self.start = self._now() if self.granularity else 0
        self._started = time.monotonic_ns()
        self._passed = self.start  # the newest timestamp a probe got
        self._deadline: float | None = None
        self.waited_s = 0.0

    def _now(self) -> int:
        path = os.path.join(self.directory, f".clock-probe-{uuid.uuid4().hex}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            return _probe_ctime(fd)
        finally:
            os.close(fd)
            os.unlink(path)

    def unsettled(self, dev: int, mtime_ns: int, *, since: int | None = None) -> bool:
        """Whether a write after a stat that showed ``mtime_ns`` (of a file on device
        ``dev``) could leave it unchanged.

        ``since``: a timestamp this filesystem gave at or before the moment of that stat,
        if newer than :attr:`start` (the ctime a link just made). A file on another
        filesystem is judged by its own timestamps alone: this clock is not its. An mtime
        well ahead of the clock (a file stamped in the future) cannot be what a write
        gets now, so it counts as settled.
        """
        if not self.granularity or dev != self.dev:
            return False
        ref = self.start if since is None else since
        # Where the clock can be by now, with a granule to spare either side.
        horizon = self.start + (time.monotonic_ns() - self._started) + 2 * self.granularity
        return ref <= mtime_ns <= max(horizon, self._passed)

    def wait_s(self, mtime_ns: int) -> float:
        """About how long :meth:`settle` would wait for ``mtime_ns``, by the wall clock."""
        if self._passed > mtime_ns:
            return 0.0
        return max(0.0, (mtime_ns + self.granularity - time.time_ns()) / 1e9)

    def settle(self, mtime_ns: int) -> bool:
        """Wait until a write on this filesystem gets a timestamp after ``mtime_ns``.

        False if that is not so within what is left of this snapshot's bound.
        """
        if self._passed > mtime_ns:
            return True
        t0 = time.monotonic()
        if self._deadline is None:
            self._deadline = t0 + MAX_WAIT_S
        path = os.path.join(self.directory, f".clock-probe-{uuid.uuid4().hex}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while True:
                self._passed = max(self._passed, _probe_ctime(fd))
                if self._passed > mtime_ns:
                    return True
                if time.monotonic() >= self._deadline:
                    return False
                left_ns = mtime_ns + self.granularity - time.time_ns()
                time.sleep(min(max(left_ns / 1e9, 0.0005), 0.05))
        finally:
            os.close(fd)
            os.unlink(path)
            self.waited_s += time.monotonic() - t0
