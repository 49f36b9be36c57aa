"""Bearer tokens for Google Cloud Storage from google-auth credentials.

The backend does not find credentials itself: whoever builds it passes a function that
returns google-auth credentials (the Metaflow face passes Metaflow's own resolution, so
checkpoints use exactly the identity Metaflow's GS datastore uses). Resolving and
refreshing block on the network, so both run in a worker thread, one at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

__all__ = ["CredentialsToken"]


class CredentialsToken:
    """What gcloud-aio-storage asks a token for (``await get()``), from google-auth
    credentials that ``resolve()`` returns the first time a request needs them."""

    def __init__(self, resolve: Callable[[], Any]) -> None:
        self._resolve = resolve
        self._creds: Any = None
        self._lock = anyio.Lock()

    def _refresh(self) -> None:
        from google.auth.transport.requests import Request

        self._creds.refresh(Request())

    async def get(self) -> str:
        async with self._lock:
            if self._creds is None:
                self._creds = await anyio.to_thread.run_sync(self._resolve)
            if not self._creds.valid:  # never fetched, or about to expire
                await anyio.to_thread.run_sync(self._refresh)
            return str(self._creds.token)

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.get()}"}

    async def close(self) -> None:
        """Nothing to release (gcloud-aio-storage closes its token with the client)."""
