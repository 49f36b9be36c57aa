"""Every exception the engine raises, in one place.

::

    CheckpointError                      base of everything below
    ├── ConfigError (also ValueError)    a setting is out of range; raised while parsing settings
    ├── SnapshotError                    save() could not snapshot the source path
    ├── UploadError                      a checkpoint could not be stored; raised by wait()/drain
    │   ├── TornCheckpointError          a file changed in place while it was being saved
    │   ├── StorageAccessError           not retryable: denied, no such bucket, bad credentials
    │   └── SourceReadError              a file being saved could not be read (the user's side)
    ├── LoadError                        a committed checkpoint could not be loaded; raised on load
    │   ├── ChecksumMismatchError        stored bytes differ from the manifest
    │   └── ManifestError                a manifest that cannot be read (corrupt, or too new)
    └── EngineClosedError                the engine was used after close()

Messages name the checkpoint, the file and the storage key involved, and say what to do.
"""

from __future__ import annotations

import anyio

__all__ = [
    "CheckpointError",
    "ChecksumMismatchError",
    "ConfigError",
    "EngineClosedError",
    "LoadError",
    "ManifestError",
    "SnapshotError",
    "SourceReadError",
    "StorageAccessError",
    "TornCheckpointError",
    "UploadError",
    "first_error",
]


class CheckpointError(Exception):
    """Base class of every error raised by the checkpoint engine."""


class ConfigError(CheckpointError, ValueError):
    """Raised by :func:`uploader.config.parse_settings` for a malformed or out-of-range value."""


class SnapshotError(CheckpointError):
    """Raised by ``save()`` in the caller's thread when the source cannot be snapshotted."""


class UploadError(CheckpointError):
    """Raised by ``wait()`` and the drain when a checkpoint could not be committed.

    ``checkpoint_id`` names the checkpoint; ``key`` the storage key involved, when one is.
    """

    def __init__(self, message: str, *, checkpoint_id: str = "", key: str = "") -> None:
        super().__init__(message)
        self.checkpoint_id = checkpoint_id
        self.key = key


class TornCheckpointError(UploadError):
    """A file was rewritten in place while it was being saved (as ``save()`` froze it, or
    while its upload was pending), so the checkpoint was dropped.

    Raised by ``wait()`` on that checkpoint. ``path`` is the file, relative to the saved directory.
    """

    def __init__(self, message: str, *, checkpoint_id: str, path: str) -> None:
        super().__init__(message, checkpoint_id=checkpoint_id)
        self.path = path


class StorageAccessError(UploadError):
    """The store refused a request in a way that retrying cannot fix (permissions, bucket, keys)."""


class SourceReadError(UploadError):
    """A file of the checkpoint could not be read while it was uploaded.

    The user's side, not the store's: its permissions changed, or it was removed from
    under the snapshot. Raised by ``wait()`` on that checkpoint.
    """


class LoadError(CheckpointError):
    """Raised by ``load()`` when a committed checkpoint cannot be copied out of the store.

    A stored object is missing or unreadable, or the destination refuses a file. The
    destination is left as it was: files are placed only once every one is verified.
    """


class ChecksumMismatchError(LoadError):
    """Raised by ``load()`` when a stored file's bytes do not match the checksum in its manifest."""


class ManifestError(LoadError):
    """A manifest that cannot be read: not JSON, missing fields, or written by a newer version
    that older readers must not read.

    Raised by :meth:`uploader.manifest.Manifest.from_json`; readers that list checkpoints
    skip such a manifest with a warning rather than fail.
    """


class EngineClosedError(CheckpointError):
    """Raised when a closed engine is asked to save or load."""


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error that made a task group fail, rather than the cancellations it caused."""
    for exc in group.exceptions:
        found = first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if not isinstance(found, anyio.get_cancelled_exc_class()):
            return found
    return group.exceptions[0]
