"""Where the data plane runs: worker threads of this process, or a worker process.

The coordinator (the S3 or Azure backend, on the engine's event loop) hands each request to a
*plane* and awaits its :class:`~.jobs.Outcome`:

- :class:`ThreadPlane` runs :class:`~..s3.dataplane.DataPlane` (or for Azure,
  :class:`~..azure.dataplane.AzureDataPlane`: the spec says which) in worker threads of the
  task's process. Each part costs the GIL a handful of times (a thread hop, the read, two
  hashes, the send, the reply).
- :class:`ProcessPlane` runs it in a spawned worker process (:mod:`.worker`). The
  task's process then spends one pipe write and one read per request, and the bytes never
  cross its GIL.

The plane that reads a save's uploads also reads the files an incremental save finds
unchanged (:meth:`Plane.hash_file`): their bytes are hashed, never sent, and a worker
process keeps that off the task's GIL as it does for uploads.

Either way retries, aborts and the commit stay with the coordinator. The worker process is
not a single point of failure: one that exits or is killed (the out-of-memory killer) is
reaped and replaced, and the requests it held fail with the transient
:class:`~.jobs.WorkerGone`, so the coordinator retries them under its retry policy. One
that leaves a request unanswered past a deadline (stopped, stuck in I/O) is killed and
replaced the same way, so the limiter slots its requests hold are given back. After
:data:`MAX_DEATHS` deaths in a task the rest of the task's uploads run in threads.

A multipart file's running SHA-256 lives in the plane that reads its parts. When that
plane is a worker process that died, the file's later parts are sent without it and the
file is hashed again at the end, from disk, each part checked against the CRC32 it was
uploaded with (:func:`~.parts.digest_of_parts`), so the digest is still that of the
bytes stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
import anyio.to_thread

from ...config import MiB
from ...incremental import sha256_file
from .jobs import Cancelled, Job, Outcome, Spec, WorkerGone
from .worker import WorkerProcess

__all__ = ["MAX_DEATHS", "Plane", "ProcessPlane", "ThreadPlane", "WorkerGone"]

# Worker process deaths in one task after which its uploads go on in threads.
MAX_DEATHS = 3

Parts = Sequence[tuple[int, int, str]]  # (offset, length, CRC32) of each part sent

_planes: weakref.WeakSet[ProcessPlane] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) must not hold the parent's pipes open: a worker
    # ends when its input closes, which would then wait for every such child.
    for plane in list(_planes):
        plane._forget_parent()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Plane(Protocol):
    async def run(self, job: Job) -> Outcome: ...

    async def file_digest(self, file_id: int, *, path: str, parts: Parts) -> str:
        """The SHA-256 of the file whose parts, ``parts``, were sent as ``file_id``."""
        ...

    async def drop_file(self, file_id: int) -> None: ...

    async def hash_file(self, path: str, size: int) -> str:
        """The SHA-256 of the file at ``path`` (``size`` bytes), read where uploads are."""
        ...

    async def aclose(self) -> None: ...


class ThreadPlane:
    """The data plane in worker threads of this process (at most ``threads`` at once)."""

    def __init__(self, spec: Spec, threads: int) -> None:
        self.plane = spec.plane()
        self._threads = anyio.CapacityLimiter(threads)

    async def run(self, job: Job) -> Outcome:
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

    async def file_digest(self, file_id: int, *, path: str, parts: Parts) -> str:
        return self.plane.file_digest(file_id)

    async def drop_file(self, file_id: int) -> None:
        self.plane.drop_file(file_id)

    async def hash_file(self, path: str, size: int) -> str:
        return await anyio.to_thread.run_sync(sha256_file, path, limiter=self._threads)

    async def aclose(self) -> None:
        self.plane.close()


class ProcessPlane:
    """The data plane in a worker process, started at the first request and replaced
    whenever it dies; in threads (:class:`ThreadPlane`) after :data:`MAX_DEATHS` deaths.

    A request the worker leaves unanswered for ``timeout`` seconds (0: the client's connect
    plus read timeout) plus the time its bytes need at ``min_rate`` bytes per second shared
    by ``threads`` requests kills the worker. ``log`` hears of each death.
    """

    def __init__(self, spec: Spec, threads: int, *, timeout: float = 0.0,
                 min_rate: int = 2 * MiB, log: Callable[[str], None] = print) -> None:
        self._spec = spec
        self._threads = threads
        self._timeout = timeout or (spec.connect_timeout + spec.read_timeout)
        self._min_rate = min_rate
        self._log = log
        self._worker: WorkerProcess | None = None
        self._workers: list[WorkerProcess] = []  # every one started, for aclose
        self._fallback: ThreadPlane | None = None
        # Which plane holds each multipart file's running digest (see the module docstring).
        self._owner: dict[int, WorkerProcess | ThreadPlane] = {}
        self.deaths = 0
        # The pid of the process that read the last file hashed by hash_file().
        self.hashed_by: int | None = None
        self._lock = anyio.Lock()
        self._closed = False
        _planes.add(self)

    @property
    def worker(self) -> WorkerProcess | None:
        """The current worker process, None before the first request or after the fallback."""
        w = self._worker
        return w if w is not None and w.alive and self._fallback is None else None

    @property
    def in_threads(self) -> bool:
        """True once the worker died too often and requests run in threads."""
        return self._fallback is not None

    def deadline(self, length: int) -> float:
        """Seconds a request of ``length`` bytes may go unanswered before the worker is
        taken for stopped. All ``threads`` requests share the link, each at least
        ``min_rate / threads``."""
        return self._timeout + length * self._threads / self._min_rate

    def _forget_parent(self) -> None:
        # The workers stay referenced: their transports own descriptors of the parent's
        # loop, which must never be closed (or their numbers reused) from here.
        for w in self._workers:
            w.forget_parent()
        self._worker, self._owner = None, {}

    async def _target(self) -> WorkerProcess | ThreadPlane:
        while True:
            if self._fallback is not None:
                return self._fallback
            w = self._worker
            if w is not None and w.alive:
                await self._started(w)
                return w
            async with self._lock:
                if self._closed:
                    raise WorkerGone("the upload worker process was closed")
                if self._fallback is None and (self._worker is None or not self._worker.alive):
                    await self._start()

    async def _start(self) -> None:
        try:
            self._worker = await WorkerProcess.start(self._spec, self._threads, log=self._log,
                                                     on_exit=self._on_exit)
        except OSError as e:
            self._died(f"the upload worker process could not be started ({e})", 0)
            raise WorkerGone(f"the upload worker process could not be started: {e}") from e
        self._workers.append(self._worker)

    async def _started(self, worker: WorkerProcess) -> None:
        """Wait until ``worker`` has set itself up (a fresh interpreter's imports are no
        request's time), killing it if that takes longer than a request may."""
        if not worker.ready.done():
            limit = max(self._timeout, 30.0)
            with anyio.move_on_after(limit):
                await asyncio.shield(worker.ready)
            if not worker.ready.done():
                worker.kill(f"did not start within {limit:.3g} s")
        worker.ready.result()  # raises WorkerGone if it died first

    def _on_exit(self, worker: WorkerProcess, how: str, held: int) -> None:
        if not self._closed:
            self._died(f"the upload worker process (pid {worker.pid}) {how}", held)

    def _died(self, what: str, held: int) -> None:
        self.deaths += 1
        if self.deaths >= MAX_DEATHS and self._fallback is None:
            self._fallback = ThreadPlane(self._spec, self._threads)
            self._log(f"WARNING: {what}; that is {self.deaths} times in this task, so its "
                      "uploads go on in threads of the task's process from now on (they "
                      "then share the GIL with training).")
            return
        again = (f"the {held} request(s) it held are retried on a new one" if held
                 else "a new one starts with the next request")
        self._log(f"note: {what}; {again}.")

    # -- requests ----------------------------------------------------------------------

    async def run(self, job: Job) -> Outcome:
        target = await self._target()
        # A part's first attempt is hashed into its file's digest if the plane holding that
        # digest is this one; else the file is hashed again at the end.
        if job.first_in_file and self._owner.setdefault(job.file_id, target) is not target:
            job = dataclasses.replace(job, file_id=0)  # type: ignore[type-var]
        if isinstance(target, ThreadPlane):
            return await target.run(job)
        return await self._run_on(target, job)

    async def _run_on(self, worker: WorkerProcess, job: Job) -> Outcome:
        limit = self.deadline(job.length)
        until = anyio.current_time() + limit
        fut = worker.submit("run", job)
        try:
            with anyio.move_on_after(limit):
                outcome: Outcome = await asyncio.shield(fut)
                return outcome
        except asyncio.CancelledError:
            # Cancelled from outside: cut the request's connection, then wait for its reply,
            # so the worker's buffer is gone before the request's limiter slot is given
            # back; a worker that does not answer by the deadline is killed instead.
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(WorkerGone):
                    worker.cancel(job.job_id)
                with anyio.move_on_after(max(0.0, until - anyio.current_time())), \
                        contextlib.suppress(Exception):
                    await asyncio.shield(fut)
                if not fut.done():
                    worker.kill(f"left a cancelled request unanswered for {limit:.3g} s")
            raise
        if not fut.done():
            worker.kill(f"left a request of {job.length} bytes unanswered for {limit:.3g} s")
        outcome = await fut  # a reply that came just in time, or WorkerGone
        return outcome

    async def _call(self, worker: WorkerProcess, op: str, arg: object) -> Any:
        fut = worker.submit(op, arg)
        with anyio.move_on_after(self._timeout):
            return await asyncio.shield(fut)
        if not fut.done():
            worker.kill(f"left a {op} request unanswered for {self._timeout:.3g} s")
        return await fut

    async def file_digest(self, file_id: int, *, path: str, parts: Parts) -> str:
        owner = self._owner.pop(file_id, None)
        if isinstance(owner, ThreadPlane):
            return await owner.file_digest(file_id, path=path, parts=parts)
        if owner is not None and owner.alive:
            with contextlib.suppress(WorkerGone):
                digest: str = await self._call(owner, "digest", file_id)
                return digest
        # Its digest died with a worker process: hash the stored bytes again from disk.
        return await anyio.to_thread.run_sync(self._spec.digest_again, path, parts)

    async def drop_file(self, file_id: int) -> None:
        owner = self._owner.pop(file_id, None)
        if isinstance(owner, ThreadPlane):
            await owner.drop_file(file_id)
        elif owner is not None and owner.alive:
            with contextlib.suppress(WorkerGone):
                await self._call(owner, "drop", file_id)

    async def hash_file(self, path: str, size: int) -> str:
        try:
            # Either raises for a worker that died starting, or already gone.
            target = await self._target()
            if isinstance(target, ThreadPlane):
                self.hashed_by = os.getpid()
                return await target.hash_file(path, size)
            limit = self.deadline(size)
            fut = target.submit("hash", path)
            with anyio.move_on_after(limit):
                digest, self.hashed_by = await asyncio.shield(fut)
                return str(digest)
            if not fut.done():
                target.kill(f"left a request to hash a file of {size} bytes unanswered "
                            f"for {limit:.3g} s")
            digest, self.hashed_by = await fut
            return str(digest)
        except WorkerGone:
            # A worker that died while starting or reading it: the check is read here
            # instead (a new worker starts with the next request).
            self.hashed_by = os.getpid()
            return await anyio.to_thread.run_sync(sha256_file, path)

    async def aclose(self) -> None:
        self._closed = True
        with anyio.CancelScope(shield=True):
            for w in self._workers:
                await w.aclose()
            if self._fallback is not None:
                await self._fallback.aclose()
