"""A checkpoint's lifecycle, and the handle the caller holds while it uploads.

::

    PENDING ──> UPLOADING ──> COMMITTED
       │            ├───────> TORN       a file changed in place before it was read
       └────────────┴───────> FAILED     storage refused it, or it was abandoned

The engine's loop drives the transitions; any thread may wait on the handle.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import CheckpointError, UploadError

__all__ = ["CheckpointHandle", "CheckpointState", "SaveStats"]


class CheckpointState(enum.Enum):
    PENDING = "pending"
    UPLOADING = "uploading"
    COMMITTED = "committed"
    TORN = "torn"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self in (CheckpointState.COMMITTED, CheckpointState.TORN, CheckpointState.FAILED)


_LEGAL: dict[CheckpointState, frozenset[CheckpointState]] = {
    CheckpointState.PENDING: frozenset({CheckpointState.UPLOADING, CheckpointState.FAILED}),
    CheckpointState.UPLOADING: frozenset(
        {CheckpointState.COMMITTED, CheckpointState.TORN, CheckpointState.FAILED}
    ),
    CheckpointState.COMMITTED: frozenset(),
    CheckpointState.TORN: frozenset(),
    CheckpointState.FAILED: frozenset(),
}


@dataclasses.dataclass
class SaveStats:
    """What one save cost, for logs and the card. Wall-clock times are ``time.time()``."""

    saved_at: float  # when save() was called
    blocked_s: float = 0.0  # how long save() held the caller (backpressure and snapshot)
    files: int = 0
    bytes: int = 0  # the checkpoint's size: every file, uploaded or not
    private_bytes: int = 0  # copied in save(): the file is rewritten in place, or mapped shared
    # Files whose content an earlier checkpoint of the scope already stored, so the
    # manifest points at that object instead of uploading them again.
    files_skipped: int = 0
    bytes_skipped: int = 0
    # Bytes uploaded so far, counted per part (block, chunk) as the store takes it, for the
    # drain's progress.
    bytes_uploaded: int = 0
    upload_s: float | None = None  # from the start of the upload to its final state
    finished_at: float | None = None  # when it was committed, torn or failed

    @property
    def bytes_left(self) -> int:
        """Bytes not yet uploaded nor found unchanged (an upper bound while it runs)."""
        return max(0, self.bytes - self.bytes_uploaded - self.bytes_skipped)

    @property
    def throughput(self) -> float | None:
        """Bytes uploaded per second (unchanged files not counted), once it is done."""
        if not self.upload_s:
            return None
        return self.bytes_uploaded / self.upload_s


class CheckpointHandle:
    """The future of one save: its state, and ``wait()`` until it is durable."""

    def __init__(self, checkpoint_id: str, name: str, reference: dict[str, Any],
                 source: str, *, scope: str = "") -> None:
        self.checkpoint_id = checkpoint_id
        self.name = name
        self.scope = scope  # the scope prefix: a later save of the same scope supersedes it
        self.reference = reference  # what load() takes; complete once committed
        self.source = source  # the path that was saved
        self._state = CheckpointState.PENDING
        self._error: CheckpointError | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._pid = os.getpid()  # the process whose loop uploads it
        self.stats = SaveStats(saved_at=time.time())
        self.number = 0  # 1-based, in the order of its engine's saves (0: not an engine's)
        self._upload_started: float | None = None

    def __repr__(self) -> str:
        return f"<CheckpointHandle {self.name!r} {self.checkpoint_id} {self._state.value}>"

    @property
    def state(self) -> CheckpointState:
        return self._state

    @property
    def error(self) -> CheckpointError | None:
        return self._error

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the checkpoint is committed and return its reference.

        Raises the checkpoint's :class:`~uploader.errors.UploadError` if it was torn or
        failed, and :class:`TimeoutError` if ``timeout`` seconds pass first.
        """
        if not self._done.is_set() and os.getpid() != self._pid:
            # A forked child has no copy of the loop that would finish it.
            raise UploadError(
                f"checkpoint {self.name!r} ({self.checkpoint_id}) is uploaded by process "
                f"{self._pid}, of which this process is a fork; wait for it there.",
                checkpoint_id=self.checkpoint_id)
        if not self._done.wait(timeout):
            raise TimeoutError(
                f"checkpoint {self.name!r} ({self.checkpoint_id}) is still {self._state.value} "
                f"after {timeout}s"
            )
        if self._error is not None:
            raise self._error
        return self.reference

    def _transition(self, new: CheckpointState, error: CheckpointError | None = None, *,
                    before_done: Callable[[], None] | None = None) -> None:
        """Move to ``new``. ``before_done`` runs once the state and stats are final but
        before waiters wake, so what it reports comes before what they do next."""
        with self._lock:
            if new not in _LEGAL[self._state]:
                raise RuntimeError(
                    f"checkpoint {self.checkpoint_id}: illegal transition "
                    f"{self._state.value} -> {new.value}"
                )
            self._state = new
            if new is CheckpointState.UPLOADING:
                self._upload_started = time.monotonic()
            elif new.is_final:
                self.stats.finished_at = time.time()
                if self._upload_started is not None:
                    self.stats.upload_s = time.monotonic() - self._upload_started
            if new is not CheckpointState.COMMITTED and new.is_final:
                self._error = error or UploadError(
                    f"checkpoint {self.checkpoint_id} {new.value}",
                    checkpoint_id=self.checkpoint_id,
                )
        if new.is_final:
            if before_done is not None:
                before_done()
            self._done.set()
