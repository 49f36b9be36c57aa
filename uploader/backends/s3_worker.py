"""Where the data plane runs: worker threads of this process, or a spawned worker process.

The coordinator (the S3 backend, on the engine's event loop) hands each request to a
*plane* and awaits its :class:`~.s3_dataplane.Outcome`:

- :class:`ThreadPlane` runs :class:`~.s3_dataplane.DataPlane` in worker threads of the
  task's process. Each part costs the GIL a handful of times (a thread hop, the read, two
  hashes, the send, the reply).
- :class:`ProcessPlane` runs it in a child process started with ``subprocess`` (a fresh
  interpreter, never a fork of the task: no copy of the training state, of CUDA, or of
  locks held by other threads), fed over a pipe. The task's process then spends one pipe
  write and one read per request, and the bytes never cross its GIL.

Either way retries, aborts and the commit stay with the coordinator. A worker process
reads requests until its input pipe closes, so it ends with the task's process however that
ends; it ignores SIGINT and SIGTERM, which the task handles (a drain needs the worker).

    python -m uploader.backends.s3_worker IN_FD OUT_FD   # started by ProcessPlane only
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import weakref
from typing import Any, Protocol

import anyio
import anyio.to_thread

from .s3_dataplane import ClientSpec, DataPlane, Outcome, PartJob
from .s3_sender import Cancelled

__all__ = ["Plane", "ProcessPlane", "ThreadPlane", "WorkerGone"]

_HEADER = struct.Struct(">I")
_planes: weakref.WeakSet[ProcessPlane] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) must not hold the parent's pipes open: the
    # worker ends when its input closes, which would then wait for every such child.
    for plane in list(_planes):
        plane._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class WorkerGone(RuntimeError):
    """Raised by :class:`ProcessPlane` for requests in flight when its worker process exits."""


class Plane(Protocol):
    async def run(self, job: PartJob) -> Outcome: ...

    async def file_digest(self, file_id: int) -> str: ...

    async def drop_file(self, file_id: int) -> None: ...

    async def aclose(self) -> None: ...


class ThreadPlane:
    """The data plane in worker threads of this process (at most ``threads`` at once)."""

    def __init__(self, spec: ClientSpec, threads: int) -> None:
        self.plane = DataPlane(spec)
        self._threads = anyio.CapacityLimiter(threads)

    async def run(self, job: PartJob) -> Outcome:
        lock, finished = threading.Lock(), threading.Event()
        phase = "queued"

        def work() -> Outcome:
            nonlocal phase
            with lock:
                if phase == "cancelled":
                    return Outcome(error=Cancelled(f"request {job.job_id} was cancelled"))
                phase = "running"
            try:
                return self.plane.run(job)
            finally:
                finished.set()

        try:
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True,
                                                  limiter=self._threads)
        except anyio.get_cancelled_exc_class():
            with lock:
                running = phase == "running"
                phase = "running" if running else "cancelled"
            if running:
                # Cut its connection so the thread returns now, and wait for it: its buffer
                # must be gone before the limiter slot it was read under is given back.
                self.plane.cancel(job.job_id)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(finished.wait)
            raise

    async def file_digest(self, file_id: int) -> str:
        return self.plane.file_digest(file_id)

    async def drop_file(self, file_id: int) -> None:
        self.plane.drop_file(file_id)

    async def aclose(self) -> None:
        self.plane.close()


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


class _Replies(asyncio.Protocol):
    """Reads the worker's reply frames on the event loop and settles their futures."""

    def __init__(self, plane: ProcessPlane) -> None:
        self._plane = plane
        self._buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self._buf)
            if len(self._buf) < _HEADER.size + n:
                return
            req_id, ok, value = pickle.loads(self._buf[_HEADER.size:_HEADER.size + n])
            del self._buf[:_HEADER.size + n]
            self._plane._settle(req_id, ok, value)

    def connection_lost(self, exc: Exception | None) -> None:
        self._plane._gone()


class ProcessPlane:
    """The data plane in a spawned worker process, started at the first request."""

    def __init__(self, spec: ClientSpec, threads: int) -> None:
        self._spec = spec
        self._threads = threads
        self._proc: subprocess.Popen[bytes] | None = None
        self._out = -1  # our end of the request pipe
        self._transport: asyncio.BaseTransport | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._lock = anyio.Lock()
        _planes.add(self)

    def _forget_parent(self) -> None:
        # Only the request pipe's write end: the reply pipe still belongs to the parent's
        # event loop (a copy of it, never run here), which may close it one day.
        if self._out >= 0:
            with contextlib.suppress(OSError):
                os.close(self._out)
        self._out = -1
        self._proc, self._pending = None, {}

    async def _ensure(self) -> None:
        if self._proc is not None:
            return
        async with self._lock:
            if self._proc is None:
                await self._start()

    async def _start(self) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        # The worker imports this package the way this process did, wherever it came from.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "uploader.backends.s3_worker", str(req_r), str(rep_w)],
                pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL, env=env,
                close_fds=True)
        except BaseException:
            for fd in (req_r, req_w, rep_r, rep_w):
                os.close(fd)
            raise
        os.close(req_r)
        os.close(rep_w)
        os.set_blocking(req_w, True)
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.connect_read_pipe(
            lambda: _Replies(self), os.fdopen(rep_r, "rb", buffering=0))
        self._proc, self._out = proc, req_w
        self._write(("init", 0, (self._spec, self._threads)))

    def _write(self, msg: tuple[str, int, object]) -> None:
        # Small frames into a pipe the worker drains at once: a blocking write is brief.
        data = memoryview(_frame(msg))
        while data:
            data = data[os.write(self._out, data):]

    def _settle(self, req_id: int, ok: bool, value: Any) -> None:
        fut = self._pending.pop(req_id, None)
        if fut is not None and not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def _gone(self) -> None:
        proc, self._proc = self._proc, None
        code = proc.poll() if proc is not None else None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(WorkerGone(
                    f"the upload worker process exited (code {code}) with requests in flight"))
        if self._out >= 0:
            with contextlib.suppress(OSError):
                os.close(self._out)
            self._out = -1

    async def _submit(self, op: str, arg: object) -> asyncio.Future[Any]:
        await self._ensure()
        if self._proc is None:
            raise WorkerGone("the upload worker process is not running")
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            self._write((op, req_id, arg))
        except OSError as e:
            self._pending.pop(req_id, None)
            raise WorkerGone(f"the upload worker process is gone: {e}") from e
        return fut

    async def _call(self, op: str, arg: object) -> Any:
        return await (await self._submit(op, arg))

    async def run(self, job: PartJob) -> Outcome:
        fut = await self._submit("run", job)
        try:
            outcome: Outcome = await asyncio.shield(fut)
        except asyncio.CancelledError:
            # As in ThreadPlane: cut the request's connection, then wait for its reply, so
            # the worker's buffer is gone before the request's limiter slot is given back.
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                self._write(("cancel", 0, job.job_id))
                with anyio.fail_after(60):
                    await fut
            raise
        return outcome

    async def file_digest(self, file_id: int) -> str:
        digest: str = await self._call("digest", file_id)
        return digest

    async def drop_file(self, file_id: int) -> None:
        if self._proc is not None:
            with contextlib.suppress(WorkerGone):
                await self._call("drop", file_id)

    async def aclose(self) -> None:
        proc = self._proc
        if self._out >= 0:
            os.close(self._out)  # end of input: the worker finishes what it has and exits
            self._out = -1
        if proc is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_reap, proc)
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._proc = None


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the worker process ----------------------------------------------------------------------

def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _run_and_reply(plane: DataPlane, reply: Any, req_id: int, job: PartJob) -> None:
    reply(req_id, True, plane.run(job))


def serve(in_fd: int, out_fd: int) -> None:
    """Answer requests from ``in_fd`` until it closes."""
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

    plane: DataPlane | None = None
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    try:
        while (head := _read_exact(in_fd, _HEADER.size)) is not None:
            body = _read_exact(in_fd, _HEADER.unpack(head)[0])
            if body is None:
                break
            op, req_id, arg = pickle.loads(body)
            if op == "init":
                spec, threads = arg
                plane = DataPlane(spec)
                pool = concurrent.futures.ThreadPoolExecutor(threads + 2, "s3-part")
                continue
            assert plane is not None and pool is not None, "init comes first"
            if op == "run":
                pool.submit(_run_and_reply, plane, reply, req_id, arg)
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
            pool.shutdown(wait=True)
        if plane is not None:
            plane.close()


def main() -> None:
    # The task's process decides when to stop; this one ends when its input closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(int(sys.argv[1]), int(sys.argv[2]))


if __name__ == "__main__":
    main()
