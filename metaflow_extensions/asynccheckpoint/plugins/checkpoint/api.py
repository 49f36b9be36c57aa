"""``from metaflow import Checkpoint``: checkpoints from any code, in a task or not.

Framework callbacks (Lightning, Hugging Face, Keras) and helper code save through
``Checkpoint().save(...)`` without access to ``current``; notebooks list and load with
``Checkpoint().list(task=...)`` and ``load(...)``. Inside a task this is
``current.checkpoint`` (non-blocking saves, drained at the end of the task). In a process
the task started (``torchrun`` workers, a ``subprocess``), the task's identity comes from
the environment (:data:`ENV_TASK`) and saves go to the same scope; they are drained when
that process exits. Anywhere else, only ``list(task=...)`` and ``load()`` work.

Imported when ``metaflow`` is: nothing heavy at module level.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import threading
from typing import Any

__all__ = ["ENV_TASK", "Checkpoint"]

ENV_TASK = "METAFLOW_CHECKPOINT_TASK"
"""Set by a task using ``@checkpoint`` for the processes it starts: who they save for."""

_lock = threading.Lock()
_subprocess_writer: Any = None
_notebook_reader: Any = None


def _writer() -> Any:
    """The task's ``current.checkpoint``, or one for this process made from the
    environment a task left for it; None outside any task."""
    global _subprocess_writer
    from metaflow import current

    here = getattr(current, "checkpoint", None)
    if here is not None:
        return here
    spec = os.environ.get(ENV_TASK)
    if not spec:
        return None
    with _lock:
        if _subprocess_writer is None:
            from .current import CurrentCheckpoint

            _subprocess_writer = CurrentCheckpoint.from_environment(spec)
            atexit.register(_drain_subprocess_writer)
        return _subprocess_writer


def _drain_subprocess_writer() -> None:
    # No task teardown runs in a process the task started: commit what it saved now.
    writer = _subprocess_writer
    if writer is not None:
        try:
            writer._finish(success=False)
        finally:
            writer._close()


def _reader() -> Any:
    global _notebook_reader
    with _lock:
        if _notebook_reader is None:
            from ..shared.reader import Reader
            from ..shared.storage import engine_settings
            from .current import _log

            _notebook_reader = Reader(settings=engine_settings(), log=_log)
        return _notebook_reader


class Checkpoint:
    """Save, list and load checkpoints, as ``metaflow-checkpoint``'s class of that name.

    Parameters
    ----------
    temp_dir_root : str, optional
        Where ``directory`` is created (default: the system's temporary directory).
    init_dir : bool, default False
        Create ``directory`` now rather than on entering a ``with`` block.

    Examples
    --------
    In a step, or in code it calls (a framework callback)::

        Checkpoint().save(path, metadata={"epoch": epoch})

    Anywhere, a notebook included::

        with Checkpoint() as cp:
            refs = cp.list(task="MyFlow/12/train/3")
            cp.load(refs[0])          # into cp.directory
    """

    def __init__(self, temp_dir_root: str | None = None, init_dir: bool = False) -> None:
        self._temp_dir_root = temp_dir_root
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if init_dir:
            self._make_directory()

    def _make_directory(self) -> None:
        if self._temp_dir_root is not None:
            os.makedirs(self._temp_dir_root, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="metaflow_checkpoint_",
                                                dir=self._temp_dir_root)

    @property
    def directory(self) -> str | None:
        """A private directory to write checkpoint files into; None outside ``with``
        unless ``init_dir=True``."""
        return None if self._tmp is None else self._tmp.name

    def __enter__(self) -> Checkpoint:
        if self._tmp is None:
            self._make_directory()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def save(self, path: str | os.PathLike[str] | None = None,
             metadata: dict[str, Any] | None = None, latest: bool = True,
             name: str = "mfchckpt", storage_format: str = "files", *,
             wait: bool = False) -> dict[str, Any]:
        """Save ``path`` (default: ``directory``) as a checkpoint of the running task.

        Returns at once with its reference, as ``current.checkpoint.save()`` does; the
        upload runs behind. ``wait=True`` returns once it is durable. Works inside a
        task using ``@checkpoint`` and in processes it started; raises elsewhere.
        """
        from ..shared.exceptions import CheckpointException

        path = self._path_or_directory(path, "save")
        writer = _writer()
        if writer is None:
            raise CheckpointException(
                "Checkpoint.save() works inside a step that uses @checkpoint, or in a process "
                f"that step started (it finds the task through {ENV_TASK}). Outside a task, "
                "list(task=...) and load() work.")
        ref: dict[str, Any] = writer.save(path, name=name, metadata=metadata, latest=latest,
                                          storage_format=storage_format, wait=wait)
        return ref

    def list(self, name: str | None = None, task: Any = None,
             attempt: int | str | None = None,
             full_namespace: bool = False, as_dict: bool = True) -> list[dict[str, Any]]:
        """Checkpoints, newest first: of ``task`` (a pathspec or a ``metaflow.Task``; its
        latest attempt, ``attempt=N`` another, ``attempt="all"`` every one), else of the
        running task (its saves still in flight first). [] for a task that saved none."""
        from ..shared.exceptions import CheckpointReferenceError

        if task is not None:
            writer = _writer()
            reader = writer._reader if writer is not None else _reader()
            return list(reader.list_task(task, name=name, attempt=attempt))
        writer = _writer()
        if writer is None:
            raise CheckpointReferenceError(
                "Checkpoint.list() outside a task needs task=: a pathspec "
                "'Flow/run/step/task' or a metaflow.Task.")
        return list(writer.list(name=name, attempt=attempt, full_namespace=full_namespace))

    def load(self, reference: Any, path: str | os.PathLike[str] | None = None, *,
             datastore_root: str | None = None) -> str:
        """Copy a checkpoint's files into ``path`` (default: ``directory``); return the path.

        ``reference``: what ``save()`` or ``list()`` returned (or an artifact holding
        it), its ``key``, a task pathspec ``Flow/run/step/task`` or a ``metaflow.Task``
        (its latest checkpoint). Files are copied, never linked, and verified. A
        reference saved under another datastore root than the one in use here loads
        only from the root passed as ``datastore_root``.
        """
        dest = self._path_or_directory(path, "load")
        writer = _writer()
        if writer is not None:
            return str(writer.load(reference, dest, datastore_root=datastore_root))
        reader = _reader()
        catalog, entry = reader.resolve(reference, datastore_root=datastore_root)
        return str(reader.load(catalog, entry, dest))

    def wait(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Block until every save of this task (or process) so far is durable."""
        writer = _writer()
        return [] if writer is None else list(writer.wait(timeout))

    def _path_or_directory(self, path: str | os.PathLike[str] | None, what: str) -> str:
        from ..shared.exceptions import CheckpointReferenceError

        if path is not None:
            return os.path.abspath(os.fspath(path))
        if self.directory is None:
            raise CheckpointReferenceError(
                f"Checkpoint.{what}() without a path needs a directory: use it as "
                "`with Checkpoint() as cp:` or create it with Checkpoint(init_dir=True).")
        return self.directory
