"""What the planes and the worker process know of a data plane: its spec, its jobs, what
a job came to, and the two ways a request ends short of the store's own answer.

A data plane (S3's :mod:`..s3.dataplane`, Azure's
:mod:`..azure.dataplane`) keeps these shapes; a spec says which data plane
it makes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["Cancelled", "Job", "Outcome", "Runner", "Spans", "Spec", "WorkerGone"]

Spans = Sequence[tuple[int, int, str]]  # (offset, length, checksum) of each part sent


class Runner(Protocol):
    """A data plane: runs jobs, keeps files' running digests (thread-safe)."""

    def run(self, job: Any) -> Outcome: ...

    def file_digest(self, file_id: int) -> str: ...

    def drop_file(self, file_id: int) -> None: ...

    def cancel(self, job_id: int) -> None: ...

    def close(self) -> None: ...


class Spec(Protocol):
    """How a data plane reaches its store (picklable): it makes the data plane."""

    @property
    def connect_timeout(self) -> float: ...

    @property
    def read_timeout(self) -> float: ...

    def plane(self) -> Runner: ...

    def digest_again(self, path: str, parts: Spans) -> str:
        """A file's digest (as ``Runner.file_digest`` gives it), read again from disk,
        each part checked against the checksum it was sent with."""
        ...


class Job(Protocol):
    """One request of a data plane (a frozen dataclass)."""

    @property
    def job_id(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def file_id(self) -> int: ...

    @property
    def first_in_file(self) -> bool:
        """Whether this attempt feeds its file's running digest in the plane running it."""
        ...


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a request came to. ``checksum`` is set once the part was read, even when the
    send failed, so the coordinator can hold a retry to the same bytes."""

    etag: str | None = None
    checksum: str | None = None
    digest: str | None = None  # the whole file's SHA-256, for a PutObject of a file
    error: BaseException | None = None


class WorkerGone(RuntimeError):
    """Raised by the upload worker process's planes (:mod:`.worker`) for a request the
    worker process was holding when it exited, was killed, or stopped answering. Transient:
    the request is retried on a new worker process (or, after repeated deaths, in threads)."""


class Cancelled(Exception):
    """Raised in a worker thread whose request the coordinator gave up on (cancelled)."""
