"""The Azure Blob Storage backend. Needs the [azure] extra (azure-storage-blob with aiohttp);
importing this package does not import it, asking for :class:`AzureBackend` does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import AzureBackend, block_size_for

__all__ = ["AzureBackend", "block_size_for"]


def __getattr__(name: str) -> Any:
    # The worker process imports .dataplane to unpickle a spec; it needs no asyncio client.
    if name in __all__:
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
