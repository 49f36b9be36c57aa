"""Trees of files for round-trip tests, and engines on both stores to send them through."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from enginekit import SCOPE, make_engine
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server

from uploader import (
    CheckpointKeys,
    CheckpointState,
    Engine,
    SaveRequest,
    Scope,
    Settings,
    TransferContext,
    new_checkpoint_id,
)
from uploader.catalog import Catalog, Entry

MiB = 1 << 20


def s3_engine(server: S3Server, tmp: Path, bucket: str, *, prefix: str = "metaflow",
              **settings: Any) -> Engine:
    """An engine on the S3 server, with credentials of its own (no environment needed)."""

    def factory(ctx: TransferContext) -> Any:
        import aioboto3

        from uploader.backends.s3 import S3Backend

        session = aioboto3.Session(aws_access_key_id=ACCESS_KEY,
                                   aws_secret_access_key=SECRET_KEY, region_name=REGION)
        return S3Backend(ctx, bucket=bucket, prefix=prefix, endpoint_url=server.endpoint,
                         region=REGION, session=session)

    return Engine(factory, Settings(**settings), snapshot_dir=str(tmp / "snapshots"),
                  log=lambda m: None)


def fresh_bucket(server: S3Server) -> str:
    """A new empty bucket on a reset server (moto keeps everything in memory)."""
    server.reset()
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.client().create_bucket(Bucket=name)
    return name


def local_engine(tmp: Path, **settings: Any) -> Engine:
    return make_engine(tmp, **settings)


def save_request(source: Path | str, *, name: str = "ck", scope: Scope = SCOPE,
                 run_id: str = "1", metadata: dict[str, Any] | None = None,
                 attempt: int = 0) -> SaveRequest:
    cid = new_checkpoint_id("7", attempt)
    return SaveRequest(
        source=str(source), keys=CheckpointKeys(scope.prefix, run_id, cid), name=name,
        latest=True, metadata=dict(metadata or {}),
        identity={"task_id": "7", "attempt": attempt}, reference={"created_on": "now"})


def round_trip(engine: Engine, source: Path, dest: Path, *, scope: Scope = SCOPE,
               run_id: str | None = None) -> Entry:
    """Save ``source``, wait for the commit, and load what was committed into ``dest``."""
    req = save_request(source, scope=scope, run_id=run_id or uuid.uuid4().hex[:8])
    handle = engine.save(req)
    handle.wait(120)
    assert handle.state is CheckpointState.COMMITTED
    entry = Catalog(engine).read(req.keys.manifest)
    assert entry is not None
    Catalog(engine).load(entry, str(dest))
    return entry


def read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (relative POSIX path -> bytes); no links allowed."""
    out: dict[str, bytes] = {}
    for dirpath, dirnames, names in os.walk(root):
        for n in dirnames + names:
            assert not os.path.islink(os.path.join(dirpath, n)), os.path.join(dirpath, n)
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root).replace(os.sep, "/")] = Path(p).read_bytes()
    return out


def saved_view(root: Path) -> dict[str, bytes]:
    """What a checkpoint of ``root`` holds: its files, and what links inside it point to."""
    out: dict[str, bytes] = {}
    for dirpath, _dirnames, names in os.walk(root, followlinks=True):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root).replace(os.sep, "/")] = Path(p).read_bytes()
    return out


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root.joinpath(*rel.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
