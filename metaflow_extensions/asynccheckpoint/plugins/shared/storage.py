"""Maps Metaflow's datastore settings to an engine backend and its settings."""

from __future__ import annotations

from typing import Any

from uploader import LocalBackend, RetentionPolicy, Settings, TransferContext, parse_settings
from uploader.config import SETTING_NAMES
from uploader.engine import BackendFactory
from uploader.errors import ConfigError

from .exceptions import CheckpointConfigException

SUPPORTED_DATASTORES = ("local", "s3", "azure", "gs")


def engine_settings() -> Settings:
    """Settings from ``METAFLOW_CHECKPOINT_*`` (environment or Metaflow config file)."""
    from metaflow import metaflow_config

    from .logs import log_level

    log_level()  # a bad METAFLOW_CHECKPOINT_LOG_LEVEL fails the step as it starts, too
    raw = {n: getattr(metaflow_config, "CHECKPOINT_" + n, None) for n in SETTING_NAMES}
    try:
        return parse_settings(raw, prefix="METAFLOW_CHECKPOINT_")
    except ConfigError as e:
        raise CheckpointConfigException(str(e)) from e


def retention_settings(attributes: dict[str, Any], where: str
                       ) -> tuple[RetentionPolicy, float]:
    """The retention policy and debris grace of a step: decorator arguments, else
    ``METAFLOW_CHECKPOINT_*``. Raises :class:`CheckpointConfigException` naming the bad
    argument or variable, and what is allowed."""
    from metaflow import metaflow_config

    from uploader.retention import BEST_MODES, parse_count, parse_grace

    def pick(arg: str) -> tuple[Any, str]:
        value = attributes.get(arg)
        if value is not None:
            return value, f"{where}: {arg}={value!r}"
        var = "CHECKPOINT_" + arg.upper()
        value = getattr(metaflow_config, var, None)
        return value, f"METAFLOW_{var}={value!r}"

    try:
        keep_last = parse_count(*pick("keep_last"))
        keep_best = parse_count(*pick("keep_best"))
        metric, metric_name = pick("best_metric")
        if isinstance(metric, str):
            metric = metric.strip() or None
        if metric is not None and not isinstance(metric, str):
            raise ValueError(f"{metric_name} is not valid: expected the name of a metadata "
                             "key passed to save(), e.g. 'val_loss'.")
        mode, mode_name = pick("best_mode")
        mode = "min" if mode is None or mode == "" else mode
        if not isinstance(mode, str) or mode.strip().lower() not in BEST_MODES:
            raise ValueError(f"{mode_name} is not valid: expected one of "
                             f"{', '.join(repr(m) for m in BEST_MODES)} ('min': lower is "
                             "better).")
        if keep_best is not None and metric is None:
            raise ValueError(
                f"{pick('keep_best')[1]} needs a metric to rank checkpoints by: set "
                "best_metric (a metadata key passed to save(), e.g. best_metric='val_loss') "
                "or METAFLOW_CHECKPOINT_BEST_METRIC.")
        grace = parse_grace(*pick("debris_grace"))
        policy = RetentionPolicy(keep_last=keep_last, keep_best=keep_best, best_metric=metric,
                                 best_mode=mode.strip().lower())
    except ValueError as e:
        raise CheckpointConfigException(str(e)) from e
    return policy, grace


def backend_factory(datastore: str, root: str) -> BackendFactory:
    """A factory for the backend that stores checkpoints next to Metaflow's own data."""
    if datastore == "local":
        def local(ctx: TransferContext) -> Any:
            return LocalBackend(root, ctx)
        return local
    if datastore == "s3":
        from .s3_storage import s3_backend_factory

        return s3_backend_factory(root)
    if datastore == "azure":
        from .azure_storage import azure_backend_factory

        return azure_backend_factory(root)
    if datastore == "gs":
        from .gs_storage import gs_backend_factory

        return gs_backend_factory(root)
    raise CheckpointConfigException(
        "@checkpoint stores checkpoints in the Metaflow datastore, and supports the %s "
        "datastores; this run uses %r. Run with --datastore=%s."
        % (", ".join(SUPPORTED_DATASTORES), datastore,
           " or --datastore=".join(SUPPORTED_DATASTORES)))
