"""A non-blocking checkpoint engine: snapshot in O(files), upload in the background.

Knows nothing of Metaflow; ``metaflow_extensions`` builds ``@checkpoint`` on top of it.
"""

from .backends import Backend, LocalBackend, TransferContext
from .config import Settings, SnapshotMode, parse_settings
from .engine import DrainReport, Engine, SaveRequest
from .errors import (
    CheckpointError,
    ChecksumMismatchError,
    ConfigError,
    EngineClosedError,
    LoadError,
    ManifestError,
    SnapshotError,
    SourceReadError,
    StorageAccessError,
    TornCheckpointError,
    UploadError,
)
from .handle import CheckpointHandle, CheckpointState, SaveStats
from .layout import (
    MODELS_PREFIX,
    ROOT_PREFIX,
    CheckpointKeys,
    Scope,
    checkpoint_order,
    foreach_token,
    new_checkpoint_id,
    value_fingerprint,
)
from .manifest import FileEntry, Manifest
from .retry import RetryPolicy
from .snapshot import Snapshot, take_snapshot

__all__ = [
    "MODELS_PREFIX",
    "ROOT_PREFIX",
    "Backend",
    "CheckpointError",
    "CheckpointHandle",
    "CheckpointKeys",
    "CheckpointState",
    "ChecksumMismatchError",
    "ConfigError",
    "DrainReport",
    "Engine",
    "EngineClosedError",
    "FileEntry",
    "LoadError",
    "LocalBackend",
    "Manifest",
    "ManifestError",
    "RetryPolicy",
    "SaveRequest",
    "SaveStats",
    "Scope",
    "Settings",
    "Snapshot",
    "SnapshotError",
    "SnapshotMode",
    "SourceReadError",
    "StorageAccessError",
    "TornCheckpointError",
    "TransferContext",
    "UploadError",
    "checkpoint_order",
    "foreach_token",
    "new_checkpoint_id",
    "parse_settings",
    "take_snapshot",
    "value_fingerprint",
]
