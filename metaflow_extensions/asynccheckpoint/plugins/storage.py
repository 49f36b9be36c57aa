"""Maps Metaflow's datastore settings to an engine backend and its settings."""

from __future__ import annotations

from typing import Any

from uploader import LocalBackend, Settings, TransferContext, parse_settings
from uploader.config import SETTING_NAMES
from uploader.engine import BackendFactory
from uploader.errors import ConfigError

from .exceptions import CheckpointConfigException

SUPPORTED_DATASTORES = ("local", "s3")


def engine_settings() -> Settings:
    """Settings from ``METAFLOW_CHECKPOINT_*`` (environment or Metaflow config file)."""
    from metaflow import metaflow_config

    raw = {n: getattr(metaflow_config, "CHECKPOINT_" + n, None) for n in SETTING_NAMES}
    try:
        return parse_settings(raw, prefix="METAFLOW_CHECKPOINT_")
    except ConfigError as e:
        raise CheckpointConfigException(str(e)) from e


def backend_factory(datastore: str, root: str) -> BackendFactory:
    """A factory for the backend that stores checkpoints next to Metaflow's own data."""
    if datastore == "local":
        def local(ctx: TransferContext) -> Any:
            return LocalBackend(root, ctx)
        return local
    if datastore == "s3":
        from .s3_storage import s3_backend_factory

        return s3_backend_factory(root)
    raise CheckpointConfigException(
        "@checkpoint stores checkpoints in the Metaflow datastore, and supports the %s "
        "datastores; this run uses %r. Run with --datastore=local or --datastore=s3."
        % (" and ".join(SUPPORTED_DATASTORES), datastore)
    )
