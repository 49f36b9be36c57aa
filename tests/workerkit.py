"""Upload worker processes as /proc shows them, and flows to interact with while they run."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

WORKER_MODULE = b"uploader.backends.plane.worker"


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id) of ``pid``, or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    return fields[0], int(fields[1]), int(fields[3])


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def workers_of(parent: int) -> list[int]:
    """Live upload worker processes whose parent is ``parent``."""
    out = []
    for pid in _pids():
        st = _stat(pid)
        if st is not None and st[1] == parent and alive(pid) and WORKER_MODULE in _cmdline(pid):
            out.append(pid)
    return out


def in_session(sid: int) -> list[int]:
    """Live processes of session ``sid``."""
    return [pid for pid in _pids() if (st := _stat(pid)) is not None and st[2] == sid
            and alive(pid)]


def descriptors(pid: int) -> set[str]:
    """What each open descriptor of ``pid`` refers to (``pipe:[123]``, a path, ...)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def gone_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` ends (or is a zombie) within ``seconds``; reaps it if it is ours.

    Polls a condition under a deadline: the deadline only bounds how long a failure takes
    to show, it is not what the test measures."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


class RunningFlow:
    """A flow run as users run it, whose merged output a test reads while it runs."""

    def __init__(self, flow: Path, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(flow), "--no-pylint", "run"], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        """The first line from now on that matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matched {pattern!r} in {timeout} s:\n"
                                     + "".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"the flow ended before a line matched {pattern!r}:\n"
                                     + "".join(self.lines))
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        """Wait for the flow to end; its exit code and its whole output."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._reader.join(10)
        while (line := self._queue.get_nowait() if not self._queue.empty() else None):
            self.lines.append(line)
        return code, "".join(self.lines)

    def kill(self) -> None:
        """Kill the flow and every process of its session (its tasks, their workers)."""
        sid = self.proc.pid
        for pid in in_session(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
