"""The Azure backend configured the way Metaflow's own Azure datastore is.

The container and prefix come from the datastore root (``METAFLOW_DATASTORE_SYSROOT_AZURE``,
``container/prefix``), the account from ``METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT``,
and the credential from the Azure client provider Metaflow is configured with
(``METAFLOW_DEFAULT_AZURE_CLIENT_PROVIDER``; by default azure.identity's
DefaultAzureCredential). That provider's credential is synchronous and asked for tokens from
a worker thread; the SDK caches each token until it nears its expiry. Block bodies go out
from the upload worker process with a bearer token from it handed along with each block.
A CA bundle named by ``REQUESTS_CA_BUNDLE`` (or ``CURL_CA_BUNDLE``), which Metaflow's own
(requests-based) client honours, is used here too.
"""

from __future__ import annotations

import os
from typing import Any

from uploader import TransferContext
from uploader.engine import BackendFactory

from .exceptions import CheckpointConfigException

INSTALL = "pip install 'metaflow-async-checkpoint[azure]'"
SCHEME = "az://"


def split_azure_root(root: str) -> tuple[str, str]:
    """``(container, prefix)`` of ``container/prefix`` (Metaflow's form) or of
    ``az://container/prefix`` (the form a checkpoint reference records)."""
    path = root[len(SCHEME):] if root.startswith(SCHEME) else root
    container, _, prefix = path.partition("/")
    if not container or path.startswith("/") or "//" in path or path.endswith("/"):
        raise CheckpointConfigException(
            f"the Azure datastore root {root!r} is not of the form container/prefix (no "
            "leading, trailing or doubled slashes); check METAFLOW_DATASTORE_SYSROOT_AZURE.")
    return container, prefix


def _ca_bundle() -> bool | str:
    # What requests (so Metaflow's own Azure client) verifies the endpoint's certificate with.
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True


def azure_backend_factory(root: str) -> BackendFactory:
    from metaflow import metaflow_config as c

    container, prefix = split_azure_root(root)
    endpoint = getattr(c, "AZURE_STORAGE_BLOB_SERVICE_ENDPOINT", None)
    if not endpoint:
        raise CheckpointConfigException(
            "the Azure datastore needs the storage account's blob endpoint: set "
            "METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT (e.g. "
            "https://ACCOUNT.blob.core.windows.net/).")
    try:
        import azure.identity
        import azure.storage.blob.aio  # noqa: F401
    except ImportError as e:
        raise CheckpointConfigException(
            f"@checkpoint on the Azure datastore needs the Azure SDK ({e}); install it with: "
            f"{INSTALL}") from e
    from metaflow.plugins.azure.azure_credential import create_cacheable_azure_credential

    try:
        credential = create_cacheable_azure_credential()
    except ValueError as e:  # an unknown METAFLOW_DEFAULT_AZURE_CLIENT_PROVIDER
        raise CheckpointConfigException(
            f"{e}; check METAFLOW_DEFAULT_AZURE_CLIENT_PROVIDER.") from e
    verify = _ca_bundle()

    def factory(ctx: TransferContext) -> Any:
        from uploader.backends.azure import AzureBackend

        return AzureBackend(ctx, account_url=endpoint, container=container, prefix=prefix,
                            credential=credential, verify=verify)

    return factory
