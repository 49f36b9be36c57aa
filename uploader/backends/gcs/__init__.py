"""The Google Cloud Storage backend. Needs the [gcs] extra (gcloud-aio-storage, google-crc32c);
importing this package does not import it, asking for :class:`GCSBackend` does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import GCSBackend, chunk_size_for

__all__ = ["GCSBackend", "chunk_size_for"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
