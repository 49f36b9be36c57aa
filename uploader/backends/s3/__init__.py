"""The S3 backend (and S3-compatible servers). Needs aioboto3, a core dependency that takes
most of a second to import: importing this package does not import it, asking for
:class:`S3Backend` does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import S3Backend, is_transient, part_size_for

__all__ = ["S3Backend", "is_transient", "part_size_for"]


def __getattr__(name: str) -> Any:
    # The worker process imports .dataplane to unpickle a spec; it must not pay for aioboto3.
    if name in __all__:
        from . import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
