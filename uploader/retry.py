"""The retry policy: one explicit value shared by every backend request.

Only the backend knows which of its errors are transient, so it supplies the predicate;
the policy supplies attempts, a deadline and jittered exponential backoff. Each request
(one PUT, one part, one GET) is retried on its own, so a failed part never re-sends the
whole file. Client libraries underneath are configured not to retry, so the two layers
never multiply into a storm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

import tenacity

__all__ = ["RetryPolicy"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    max_attempts: int = 8  # the first attempt included
    deadline: float = 300.0  # seconds since the first attempt after which no retry starts
    initial_backoff: float = 0.1
    max_backoff: float = 10.0

    @property
    def stop(self) -> tenacity.stop.stop_base:
        return tenacity.stop_after_attempt(self.max_attempts) | tenacity.stop_after_delay(
            self.deadline
        )

    @property
    def wait(self) -> tenacity.wait.wait_base:
        return tenacity.wait_random_exponential(multiplier=self.initial_backoff,
                                                max=self.max_backoff)

    def retrying(self, is_transient: Callable[[BaseException], bool]) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(
            stop=self.stop,
            wait=self.wait,
            retry=tenacity.retry_if_exception(is_transient),
            reraise=True,
        )

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        is_transient: Callable[[BaseException], bool],
    ) -> T:
        """Await ``fn()`` until it succeeds, fails with a non-transient error, or stops."""
        async for attempt in self.retrying(is_transient):
            with attempt:
                return await fn()
        raise AssertionError("unreachable: tenacity reraises the last error")
