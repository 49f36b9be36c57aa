"""The end of a task, as ``@checkpoint`` and ``@model`` both handle it.

Each gives the step an object (``current.checkpoint``, ``current.model``) whose saves
upload in the background. However the task ends, what it saved is committed: after the
step (``task_post_step``, which fails the task for a checkpoint that failed for good),
after an exception (``task_exception``, which never hides the user's), and in
``task_finished``, the safety net for ``sys.exit()`` and ``KeyboardInterrupt``, which
skip both. The card is finished and the SIGTERM handler restored there too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metaflow.decorators import StepDecorator


class DrainingDecorator(StepDecorator):
    """A step decorator whose ``_current`` saves in the background (see the module)."""

    _label = ""  # how the decorator names itself in its messages, e.g. "@checkpoint"
    _current: Any = None
    _card: Any = None
    _finished = False
    _restore_sigterm: Callable[[], None] | None = None

    def _install_sigterm_handler(self, store: Any, grace: float,
                                 log: Callable[[str], None]) -> None:
        # Preemption sends SIGTERM and allows a grace period: use it to commit what was
        # saved, then die the way the previous handler would have.
        from . import preemption

        self._restore_sigterm = preemption.install(
            drain=store._drain_for_signal, grace=grace, cleanup=store._remove_files, log=log)

    def _after_success(self) -> None:
        """Once a successful step's saves are all committed."""

    def _released(self) -> None:
        """Once the task is over: undo what ``task_pre_step`` changed in the process."""

    def _finish_card(self, *, task_ok: bool, reason: str | None = None) -> None:
        if self._card is not None:
            self._card.finish(task_ok=task_ok, reason=reason)

    def task_decorate(self, step_func, flow, graph, retry_count, max_user_code_retries,
                      ubf_context):  # type: ignore[no-untyped-def]
        # The card goes up here, not in task_pre_step: @card's own task_pre_step, which
        # may run after ours, is what makes current.card usable.
        if self._card is not None:
            self._card.start()
        return step_func

    def task_post_step(self, step_name, flow, graph, retry_count,
                       max_user_code_retries):  # type: ignore[no-untyped-def]
        if self._current is not None and not self._finished:
            self._finished = True
            # Artifacts set by this step, so an error can name the one holding a reference.
            artifacts = {k: v for k, v in vars(flow).items() if not k.startswith("_")}
            reason = "the end of the step could not commit what it saved"
            try:
                self._current._finish(success=True, artifacts=artifacts)
                reason = None
                self._after_success()
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
                raise
            finally:
                self._finish_card(task_ok=reason is None, reason=reason)

    def task_exception(self, exception, step_name, flow, graph, retry_count,
                       max_user_code_retries):  # type: ignore[no-untyped-def]
        # Commit what the failed attempt saved, so the next attempt resumes from it; never
        # replace the user's exception with ours.
        if self._current is not None and not self._finished:
            self._finished = True
            try:
                self._current._finish(success=False)
            except Exception as e:
                print(f"[{self._label}] ERROR while draining uploads: {e}")
            self._finish_card(task_ok=False, reason=f"{type(exception).__name__}: {exception}")
        return None

    def task_finished(self, step_name, flow, graph, is_task_ok, retry_count,
                      max_user_code_retries):  # type: ignore[no-untyped-def]
        if self._current is None:
            return
        try:
            if not self._finished:
                self._finished = True
                self._current._finish(success=False)
        finally:
            self._finish_card(task_ok=is_task_ok, reason=None if is_task_ok else
                              "the task ended before the step finished (sys.exit(), an "
                              "interrupt, or an error after the step)")
            if self._restore_sigterm is not None:
                self._restore_sigterm()
                self._restore_sigterm = None
            self._current._close()
            self._current = None
            self._released()
