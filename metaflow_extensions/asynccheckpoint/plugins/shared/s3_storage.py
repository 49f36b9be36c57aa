"""The S3 backend configured the way Metaflow's own S3 client is.

Endpoint, certificate checking and session settings come from the same Metaflow
settings its datastore uses (``METAFLOW_S3_ENDPOINT_URL``, ``METAFLOW_S3_VERIFY_CERTIFICATE``,
``METAFLOW_DATATOOLS_CLIENT_PARAMS``, ``METAFLOW_DATATOOLS_SESSION_VARS``); credentials come
from boto's default chain (environment, profile, instance role). A ``config`` in the client
params (timeouts, proxies, a client certificate) applies as it does to Metaflow's own
clients, except its ``retries``: the engine retries each request itself.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from uploader import TransferContext
from uploader.engine import BackendFactory

from .exceptions import CheckpointConfigException


def split_s3_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise CheckpointConfigException(
            f"the S3 datastore root {url!r} is not an s3://bucket/prefix URL; "
            "check METAFLOW_DATASTORE_SYSROOT_S3.")
    return parsed.netloc, parsed.path.strip("/")


def s3_backend_factory(root: str) -> BackendFactory:
    from metaflow import metaflow_config as c

    bucket, prefix = split_s3_url(root)
    params: dict[str, Any] = dict(getattr(c, "DATATOOLS_CLIENT_PARAMS", None) or {})
    endpoint = params.pop("endpoint_url", None) or getattr(c, "S3_ENDPOINT_URL", None)
    region = params.pop("region_name", None)
    config = params.pop("config", None)
    if isinstance(config, dict):  # as Metaflow's own clients take it
        from botocore.config import Config

        try:
            config = Config(**config)
        except TypeError as e:
            raise CheckpointConfigException(
                f"the 'config' in METAFLOW_DATATOOLS_CLIENT_PARAMS is not a botocore client "
                f"config: {e}") from e
    if config is not None:
        params["config"] = config  # merged into the backend's own, which keeps its retries
    session_vars: dict[str, Any] = dict(getattr(c, "DATATOOLS_SESSION_VARS", None) or {})

    def factory(ctx: TransferContext) -> Any:
        import aioboto3

        from uploader.backends.s3 import S3Backend

        return S3Backend(ctx, bucket=bucket, prefix=prefix, endpoint_url=endpoint,
                         region=region, client_kwargs=params,
                         session=aioboto3.Session(**session_vars))

    return factory
