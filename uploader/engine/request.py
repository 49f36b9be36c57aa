"""What a save asks of the engine, and the callables an engine is built with."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..backends.base import Backend, TransferContext
from ..handle import CheckpointHandle
from ..layout import CheckpointKeys

__all__ = ["BackendFactory", "CommitListener", "SaveRequest"]

BackendFactory = Callable[[TransferContext], Backend]
CommitListener = Callable[[CheckpointHandle], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SaveRequest:
    source: str
    keys: CheckpointKeys
    name: str
    latest: bool
    metadata: dict[str, Any]
    identity: dict[str, Any]
    reference: dict[str, Any]  # filled in further on commit; returned by wait()
