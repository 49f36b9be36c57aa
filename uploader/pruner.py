"""The in-task pruner: retention after each commit, in a thread of its own.

The engine calls :meth:`Pruner._on_commit` on its loop after each manifest is written;
that only asks for a prune. The pruner's thread then plans and executes it through the
engine's portal (:func:`~uploader.retention.prune`), so neither ``save()``'s caller nor
the loop ever waits for a prune, and the loop never calls its own portal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from .catalog import Catalog
from .config import size_text
from .engine import Engine
from .handle import CheckpointHandle
from .retention import DEFAULT_GRACE_S, ManifestCache, PruneReport, RetentionPolicy, prune

__all__ = ["PRUNE_DRAIN_S", "Pruner"]

# A task's teardown waits at most this long for the prune in flight.
PRUNE_DRAIN_S = 60.0


class Pruner:
    """Prunes one scope after each commit of ``engine``, in a thread of its own.

    One prune at a time; commits during a prune coalesce into one more. The set
    considered is the committed checkpoints of ``run_id`` in the scope; ``protect()``
    (called at each prune) adds ids never to delete, and every checkpoint the engine has
    not finished with is protected too. A failing prune logs a warning and nothing else.
    """

    def __init__(self, engine: Engine, scope_prefix: str, policy: RetentionPolicy, *,
                 run_id: str | None, grace_s: float = DEFAULT_GRACE_S,
                 protect: Callable[[], Iterable[str]] = lambda: (),
                 log: Callable[[str], None] = print) -> None:
        self._catalog = Catalog(engine)
        self._engine = engine
        self._scope_prefix = scope_prefix
        self._policy = policy
        self._run_id = run_id
        self._grace_s = grace_s
        self._protect = protect
        self._log = log
        self._warned: set[str] = set()
        self._cond = threading.Condition()
        self._wanted = False
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.last: PruneReport | None = None
        self._cache: ManifestCache = {}
        engine.add_commit_listener(self._on_commit)

    def _on_commit(self, handle: CheckpointHandle) -> None:
        # On the engine's loop: only say that a prune is wanted.
        if handle.scope == self._scope_prefix:
            self.request()

    def request(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._wanted = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="checkpoint-pruner",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                self._wanted, self._running = False, True
            try:
                self._prune_once()
            except Exception as e:
                # Once per message: a lasting refusal must not fill the log at every commit.
                msg = (f"WARNING: pruning old checkpoints of {self._scope_prefix} failed: "
                       f"{type(e).__name__}: {e}. Checkpoints are unaffected; each commit "
                       "tries again.")
                self._warn(msg)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()

    def _prune_once(self) -> None:
        busy = {h.checkpoint_id for h in self._engine.handles if not h.done()}
        report = prune(self._catalog, self._scope_prefix, self._policy, run_id=self._run_id,
                       protect=busy | set(self._protect()), grace_s=self._grace_s,
                       manifest_cache=self._cache)
        self.last = report
        if report.deleted_anything:
            extra = "".join([
                f", {report.debris_removed} left by failed uploads" if report.debris_removed
                else "",
                f", {report.uploads_aborted} incomplete upload(s) aborted"
                if report.uploads_aborted else ""])
            self._log(f"Retention: deleted {report.checkpoints_deleted} old checkpoint(s)"
                      f"{extra}, {size_text(report.bytes_freed)} freed.")
        for err in report.errors[:5]:
            # Once per message: the same refusal would otherwise be logged at every commit.
            self._warn(f"WARNING: retention: {err}")

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._log(message)

    def drain(self, timeout: float = PRUNE_DRAIN_S) -> bool:
        """Wait up to ``timeout`` s for the prune in flight and one still wanted; True if
        none is left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._wanted or self._running:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop: no prune starts from now on; wait up to ``timeout`` s for one running."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

