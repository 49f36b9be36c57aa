"""Helpers for engine-level tests: an engine on a local store, and a backend that can be held."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from uploader import (
    CheckpointKeys,
    Engine,
    LocalBackend,
    SaveRequest,
    Scope,
    Settings,
    TransferContext,
    new_checkpoint_id,
)

SCOPE = Scope("Flow", "user:tester", "train", ())


class GatedBackend(LocalBackend):
    """A local backend whose data uploads wait until the test opens the gate: files, and
    the small files a snapshot holds in memory (manifests and hints are not held).

    ``entered`` is set as soon as an upload is waiting, so a test can act while the
    upload is provably pending, without sleeping.
    """

    def __init__(self, root: str, ctx: TransferContext) -> None:
        super().__init__(root, ctx)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.gated = True

    async def _hold(self) -> None:
        if self.gated:
            import anyio.to_thread

            self.entered.set()
            await anyio.to_thread.run_sync(self.gate.wait)

    async def put_file(self, key: str, path: str, size: int) -> str:
        await self._hold()
        return await super().put_file(key, path, size)

    async def put_bytes(self, key: str, data: bytes) -> None:
        if "/data/" in key:
            await self._hold()
        await super().put_bytes(key, data)


def make_engine(tmp: Path, *, gated: bool = False, logs: list[str] | None = None,
                **settings: Any) -> Engine:
    store = tmp / "store"
    backend_cls = GatedBackend if gated else LocalBackend

    def factory(ctx: TransferContext) -> LocalBackend:
        return backend_cls(str(store), ctx)

    return Engine(factory, Settings(**settings), snapshot_dir=str(tmp / "snapshots"),
                  log=(logs.append if logs is not None else lambda m: None))


def request(source: Path, *, name: str = "ck", latest: bool = True, run_id: str = "1",
            scope: Scope = SCOPE, attempt: int = 0) -> SaveRequest:
    cid = new_checkpoint_id("7", attempt)
    return SaveRequest(
        source=str(source), keys=CheckpointKeys(scope.prefix, run_id, cid), name=name,
        latest=latest, metadata={"epoch": 1}, identity={"task_id": "7", "attempt": attempt},
        reference={"scope": scope.prefix, "created_on": "now"},
    )
