"""A non-blocking checkpoint engine: snapshot in O(files), upload in the background.

Knows nothing of Metaflow; ``metaflow_extensions`` builds ``@checkpoint`` on top of it.
"""

from .backends import Backend, LocalBackend, TransferContext
from .config import Settings, SnapshotMode, parse_settings
from .engine import DrainProgress, DrainReport, Engine, SaveRequest
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
from .pruner import Pruner
from .retention import (
    DEFAULT_GRACE_S,
    PrunePlan,
    PruneReport,
    RetentionPolicy,
    execute_prune,
    plan_prune,
)
from .retry import RetryPolicy
from .snapshot import Snapshot, take_snapshot

__all__ = [
    "DEFAULT_GRACE_S",
    "MODELS_PREFIX",
    "ROOT_PREFIX",
    "Backend",
    "CheckpointError",
    "CheckpointHandle",
    "CheckpointKeys",
    "CheckpointState",
    "ChecksumMismatchError",
    "ConfigError",
    "DrainProgress",
    "DrainReport",
    "Engine",
    "EngineClosedError",
    "FileEntry",
    "LoadError",
    "LocalBackend",
    "Manifest",
    "ManifestError",
    "PrunePlan",
    "PruneReport",
    "Pruner",
    "RetentionPolicy",
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
    "execute_prune",
    "foreach_token",
    "new_checkpoint_id",
    "parse_settings",
    "plan_prune",
    "take_snapshot",
    "value_fingerprint",
]
