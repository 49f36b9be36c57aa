"""One function for every item at once, on the engine's loop."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Any, TypeVar

import anyio

from ..errors import first_error

__all__ = ["each"]

T = TypeVar("T")


async def each(fn: Callable[[T], Coroutine[Any, Any, object]], items: Iterable[T]) -> None:
    """``fn(item)`` for every item, concurrently; raises the error that failed one of
    them, not the cancellations it caused in the others."""
    try:
        async with anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(fn, item)
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None
