"""Storage backends. Each writes and reads keys under one root, with the same layout."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import Backend, StoredObject, TransferContext, Upload
from .local import LocalBackend

if TYPE_CHECKING:
    from .azure.backend import AzureBackend
    from .gcs.backend import GCSBackend
    from .s3.backend import S3Backend

__all__ = ["AzureBackend", "Backend", "GCSBackend", "LocalBackend", "S3Backend", "StoredObject",
           "TransferContext", "Upload"]


def __getattr__(name: str) -> Any:
    # aioboto3 takes most of a second to import; only S3 users pay for it.
    if name == "S3Backend":
        from .s3.backend import S3Backend

        return S3Backend
    if name == "GCSBackend":  # needs the [gcs] extra (gcloud-aio-storage, google-crc32c)
        from .gcs.backend import GCSBackend

        return GCSBackend
    if name == "AzureBackend":  # azure-storage-blob is an optional extra: [azure]
        try:
            from .azure.backend import AzureBackend
        except ImportError as e:
            raise ImportError(
                f"the Azure backend needs azure-storage-blob with aiohttp ({e}); install it "
                "with: pip install 'metaflow-async-checkpoint[azure]'") from e

        return AzureBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
