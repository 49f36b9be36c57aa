"""Storage backends. Each writes and reads keys under one root, with the same layout."""

from .base import Backend, TransferContext
from .local import LocalBackend

__all__ = ["Backend", "LocalBackend", "TransferContext"]
