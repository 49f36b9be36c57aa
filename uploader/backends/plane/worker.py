"""The upload worker process: the code it runs, and the task's handle on one.

A worker is a fresh interpreter started with ``subprocess`` (never a fork of the task: no
copy of the training state, of CUDA, or of locks held by other threads). It runs
:class:`~..s3.dataplane.DataPlane` (or the data plane its spec makes: Azure's,
:mod:`..azure.dataplane`) in a thread pool, reads requests from one pipe and
answers on another, in pickled frames. :class:`WorkerProcess` is the task's side of one
such process, on the engine's event loop; :class:`~.planes.ProcessPlane` replaces it
when it dies or stops answering.

It dies with the task, however the task ends:

- It holds none of the task's descriptors but its pipes: stdin and stdout are
  ``/dev/null``, and what it writes to stderr (a traceback) reaches the task's log through
  the coordinator. A task that dies therefore closes its stdout and stderr at once, which
  is how Metaflow notices that a task died and starts its retry.
- On Linux it asks for SIGKILL when the thread that started it (the engine's loop thread)
  ends (``PR_SET_PDEATHSIG``), so a SIGKILLed task takes it along at once.
- It exits when its input pipe closes, without finishing the requests it holds: whoever
  would read their replies is gone or has given up on them.

It ignores SIGINT and SIGTERM, which the task handles (a drain needs the worker).

    python -m uploader.backends.plane.worker IN_FD OUT_FD PARENT_PID   # by WorkerProcess only
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import itertools
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from ...incremental import sha256_file
from .jobs import Runner, Spec, WorkerGone

__all__ = ["WorkerGone", "WorkerProcess", "describe_exit"]

_HEADER = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_MAX_LINE = 64 * 1024  # a stderr line longer than this is logged in pieces


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def describe_exit(code: int | None) -> str:
    """How a worker process ended, from its return code, as a sentence's predicate."""
    if code is None:
        return "is still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (as the out-of-memory killer does)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


# -- the task's side -------------------------------------------------------------------------

class _Replies(asyncio.Protocol):
    """Reads the worker's reply frames on the event loop and settles their futures."""

    def __init__(self, worker: WorkerProcess) -> None:
        self._worker = worker
        self._buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._buf)
            if len(self._buf) < _HEADER.size + n:
                return
            req_id, ok, value = pickle.loads(self._buf[_HEADER.size:_HEADER.size + n])
            del self._buf[:_HEADER.size + n]
            self._worker._settle(req_id, ok, value)

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker._lost()


class _Requests(asyncio.Protocol):
    """The request pipe's write side: it closes when the worker's end does."""

    def __init__(self, worker: WorkerProcess) -> None:
        self._worker = worker

    def connection_lost(self, exc: Exception | None) -> None:
        self._worker._lost()


class _Lines(asyncio.Protocol):
    """The worker's stderr, line by line, into the task's log."""

    def __init__(self, log: Callable[[str], None], pid: int) -> None:
        self._log, self._pid = log, pid
        self._buf = bytearray()
        self.ended = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while (end := self._buf.find(b"\n")) >= 0 or len(self._buf) > _MAX_LINE:
            cut = end if end >= 0 else _MAX_LINE
            self._say(bytes(self._buf[:cut]))
            del self._buf[:cut + (end >= 0)]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._buf:
            self._say(bytes(self._buf))
            self._buf.clear()
        self.ended.set()

    def _say(self, line: bytes) -> None:
        with contextlib.suppress(Exception):  # a log that fails must not stop the loop
            self._log(f"upload worker (pid {self._pid}): "
                      f"{line.decode('utf-8', 'replace').rstrip()}")


ExitHook = Callable[["WorkerProcess", str, int], None]


class WorkerProcess:
    """The task's handle on one worker process, used on the engine's event loop only.

    Requests go in with :meth:`submit`, whose future settles with the worker's reply. When
    the worker exits (or is killed with :meth:`kill`) every request it held fails with
    :class:`WorkerGone`, the process is reaped, and ``on_exit(worker, how, held)`` is
    called once, ``how`` saying what became of it and ``held`` how many requests it held.
    """

    def __init__(self, proc: subprocess.Popen[bytes], req_fd: int, *,
                 on_exit: ExitHook) -> None:
        self._proc = proc
        self.pid = proc.pid
        self._req_fd = req_fd  # our end of the request pipe, owned by self._requests
        self._on_exit = on_exit
        self._state = "alive"  # then "exiting" (reaping), "dead", or "closed" (by aclose)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._requests: asyncio.WriteTransport | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._burial: asyncio.Task[None] | None = None
        self._stderr: _Lines | None = None
        self.ready: asyncio.Future[Any]  # settles once the worker has set itself up

    @classmethod
    async def start(cls, spec: Spec, threads: int, *, log: Callable[[str], None],
                    on_exit: ExitHook) -> WorkerProcess:
        """Start a worker process for ``spec`` with ``threads`` request threads."""
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        # The worker imports this package the way this process did, wherever it came from.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uploader.backends.plane.worker", str(req_r), str(rep_w),
                 str(os.getpid())],
                pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=env, close_fds=True)
        except BaseException:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rep_w)
        self = cls(proc, req_w, on_exit=on_exit)
        loop = asyncio.get_running_loop()
        files = [os.fdopen(req_w, "wb", buffering=0), os.fdopen(rep_r, "rb", buffering=0)]
        try:
            requests, _ = await loop.connect_write_pipe(lambda: _Requests(self), files[0])
            self._requests = requests
            self._transports.append(requests)
            replies, _ = await loop.connect_read_pipe(lambda: _Replies(self), files[1])
            self._transports.append(replies)
            assert proc.stderr is not None
            errors, self._stderr = await loop.connect_read_pipe(
                lambda: _Lines(log, proc.pid), proc.stderr)
            self._transports.append(errors)
        except BaseException:
            for t in self._transports:
                t.close()
            for f in files:
                with contextlib.suppress(OSError):
                    f.close()
            proc.kill()
            threading.Thread(target=proc.wait, daemon=True).start()
            raise
        self.ready = self.submit("init", (spec, threads))
        return self

    @property
    def alive(self) -> bool:
        return self._state == "alive"

    @property
    def held(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    def submit(self, op: str, arg: object) -> asyncio.Future[Any]:
        """Send one request; its future settles with the reply, or fails with WorkerGone."""
        if not self.alive:
            raise WorkerGone(f"the upload worker process (pid {self.pid}) is gone")
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Whoever gave up waiting on a reply (cancelled) must not leave an error unread.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending[req_id] = fut
        self._write((op, req_id, arg))
        return fut

    def cancel(self, job_id: int) -> None:
        """Ask the worker to give up on ``job_id`` (its reply still comes)."""
        if self.alive:
            self._write(("cancel", 0, job_id))

    def _write(self, msg: tuple[str, int, object]) -> None:
        # Buffered by the transport, never blocking the loop: a stopped worker must not
        # stop the coordinator that is to find out and kill it.
        assert self._requests is not None
        if self._requests.is_closing():
            self._lost()
            raise WorkerGone(f"the upload worker process (pid {self.pid}) is gone")
        self._requests.write(_frame(msg))

    def _settle(self, req_id: int, ok: bool, value: Any) -> None:
        fut = self._pending.pop(req_id, None)
        if fut is not None and not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def _close_pipes(self) -> None:
        # Requests (dropping what is buffered) and replies; stderr runs to its own end.
        # A write pipe closed by its reader is closing already, and abort() would then end
        # its connection a second time.
        if self._requests is not None and not self._requests.is_closing():
            self._requests.abort()
        for t in self._transports[1:2]:
            t.close()

    def _lost(self) -> None:
        # A pipe closed: the worker is exiting. Reap it before telling anyone, so what is
        # said is how it ended.
        if self._state != "alive":
            return
        self._state = "exiting"
        self._close_pipes()
        self._burial = asyncio.get_running_loop().create_task(self._bury())

    async def _bury(self) -> None:
        with anyio.CancelScope(shield=True):
            code = await anyio.to_thread.run_sync(_reap, self._proc, 10.0)
            if self._stderr is not None:  # its last words (a traceback) come first
                with anyio.move_on_after(1):
                    await self._stderr.ended.wait()
        self._dead(describe_exit(code))

    def kill(self, why: str) -> None:
        """Kill the worker now (it stopped answering): ``why`` completes "the upload
        worker process (pid N) ..."."""
        if self._state not in ("alive", "exiting"):
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._close_pipes()
        # Reaped in the background: a process stuck in the kernel dies only when it returns.
        threading.Thread(target=self._proc.wait, name="upload-worker-reaper",
                         daemon=True).start()
        self._dead(f"{why}, and was killed")

    def _dead(self, how: str) -> None:
        if self._state in ("dead", "closed"):
            return
        self._state = "dead"
        pending, self._pending = self._pending, {}
        gone = f"the upload worker process (pid {self.pid}) {how}"
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkerGone(f"{gone} while holding this request"))
        self._on_exit(self, how, len(pending))

    async def aclose(self) -> None:
        """Close its input (it exits at once, dropping what it holds) and reap it."""
        if self._state == "alive":
            self._state = "closed"
            self._close_pipes()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_reap, self._proc, 5.0)
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(WorkerGone("the upload worker process was closed"))
        elif self._burial is not None:
            with anyio.CancelScope(shield=True):
                await self._burial
        for t in self._transports:
            t.close()

    def forget_parent(self) -> None:
        """In a forked child: close our copy of the request pipe, so the worker still
        sees it close when the task's process closes it (the rest belongs to the parent's
        event loop, never run here). Only a live one's: a dead one's number may name
        another file by now."""
        if self.alive:
            with contextlib.suppress(OSError):
                os.close(self._req_fd)


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# -- the worker process ----------------------------------------------------------------------

def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _run_and_reply(plane: Runner, reply: Any, req_id: int, job: object) -> None:
    reply(req_id, True, plane.run(job))


def _hash_and_reply(reply: Any, req_id: int, path: str) -> None:
    # An unchanged file's check: (its SHA-256, the pid that read it), or the OSError.
    try:
        reply(req_id, True, (sha256_file(path), os.getpid()))
    except Exception as e:
        reply(req_id, False, e)


def serve(in_fd: int, out_fd: int) -> None:
    """Answer requests from ``in_fd`` until it closes; then return at once, leaving the
    requests still running to be dropped with the process."""
    write_lock = threading.Lock()

    def reply(req_id: int, ok: bool, value: object) -> None:
        try:
            data = _frame((req_id, ok, value))
        except Exception as e:  # an error that does not pickle still reaches the caller
            data = _frame((req_id, False, RuntimeError(f"{type(value).__name__}: {e}")))
        view = memoryview(data)
        with write_lock:
            while view:
                view = view[os.write(out_fd, view):]

    plane: Runner | None = None
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    try:
        while (head := _read_exact(in_fd, _HEADER.size)) is not None:
            body = _read_exact(in_fd, _HEADER.unpack(head)[0])
            if body is None:
                break
            op, req_id, arg = pickle.loads(body)
            if op == "init":
                spec, threads = arg
                plane = spec.plane()  # the S3 or Azure data plane, as the spec says
                pool = concurrent.futures.ThreadPoolExecutor(threads + 2, "s3-part")
                reply(req_id, True, None)
                continue
            assert plane is not None and pool is not None, "init comes first"
            if op == "run":
                pool.submit(_run_and_reply, plane, reply, req_id, arg)
            elif op == "hash":
                pool.submit(_hash_and_reply, reply, req_id, arg)
            elif op == "cancel":
                plane.cancel(arg)
            else:
                try:
                    if op == "digest":
                        reply(req_id, True, plane.file_digest(arg))
                    else:
                        plane.drop_file(arg)
                        reply(req_id, True, None)
                except Exception as e:
                    reply(req_id, False, e)
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if plane is not None:
            plane.close()


def _die_with(parent: int) -> None:
    """SIGKILL this process when the thread that started it ends (Linux), and exit now if
    the task's process is already gone (it died before this took effect)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL),
                                                    0, 0, 0)
    if os.getppid() != parent:
        os._exit(0)


def main() -> None:
    # The task's process decides when to stop; this one ends with it or its input.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    in_fd, out_fd, parent = (int(a) for a in sys.argv[1:4])
    _die_with(parent)
    serve(in_fd, out_fd)
    # Not a normal exit: that would wait for the request threads still running.
    os._exit(0)


if __name__ == "__main__":
    main()
