"""The Google Cloud Storage backend configured the way Metaflow's own GS datastore is.

The root is ``METAFLOW_DATASTORE_SYSROOT_GS`` (``gs://bucket/prefix``). Credentials come
from Metaflow's GCP client provider (``METAFLOW_DEFAULT_GCP_CLIENT_PROVIDER``; by default
Google's application default credentials: ``GOOGLE_APPLICATION_CREDENTIALS``, the gcloud
CLI's login, or the machine's service account), resolved when the first request needs
them. ``STORAGE_EMULATOR_HOST`` points the backend at an emulator, as it does Google's
own client, and then no credentials are sent.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from uploader import TransferContext
from uploader.engine import BackendFactory

from .exceptions import CheckpointConfigException

INSTALL = "pip install 'metaflow-async-checkpoint[gcs]'"
SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]


def split_gs_url(url: str) -> tuple[str, str]:
    parsed = urlparse(url or "")
    if parsed.scheme != "gs" or not parsed.netloc:
        raise CheckpointConfigException(
            f"the GS datastore root {url!r} is not a gs://bucket/prefix URL; "
            "check METAFLOW_DATASTORE_SYSROOT_GS.")
    return parsed.netloc, parsed.path.strip("/")


def emulator_endpoint() -> str | None:
    """``STORAGE_EMULATOR_HOST`` as a URL (Google's clients take it with or without
    ``http://``), or None."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host:
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def metaflow_credentials() -> Any:
    """Google credentials as Metaflow's GS datastore gets them (its client provider)."""
    from metaflow.plugins.gcp.gs_storage_client_factory import get_credentials

    credentials, _project = get_credentials(SCOPES)
    return credentials


def gs_backend_factory(root: str) -> BackendFactory:
    bucket, prefix = split_gs_url(root)
    try:
        import gcloud.aio.storage  # noqa: F401
        import google.auth  # noqa: F401
        import google_crc32c  # noqa: F401
    except ImportError as e:
        raise CheckpointConfigException(
            f"@checkpoint on the gs datastore needs the Google Cloud Storage client, which is "
            f"not installed ({e}). Run: {INSTALL}") from e
    endpoint = emulator_endpoint()
    credentials = None if endpoint else metaflow_credentials

    def factory(ctx: TransferContext) -> Any:
        from uploader.backends.gcs import GCSBackend

        return GCSBackend(ctx, bucket=bucket, prefix=prefix, endpoint=endpoint,
                          credentials=credentials)

    return factory
