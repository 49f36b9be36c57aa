"""Processes that share one local store: savers that point at earlier checkpoints, and
pruners, each able to stop at a chosen point until the test lets it go on.

Run as ``python sharedkit.py '<json config>'``; the last line it prints is
``RESULT <json>``. A pause is a pair of files: the process creates ``<pause>.reached``
when it gets there, and goes on once ``<pause>.go`` exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from uploader import (  # noqa: E402
    CheckpointKeys,
    Engine,
    LocalBackend,
    Manifest,
    RetentionPolicy,
    SaveRequest,
    Scope,
    Settings,
    TransferContext,
    new_checkpoint_id,
)
from uploader.catalog import Catalog  # noqa: E402
from uploader.errors import CheckpointError  # noqa: E402
from uploader.retention import prune  # noqa: E402

SCOPE = Scope("Flow", "user:tester", "train", ())
PAUSE_WAIT_S = 120.0


def wait_for(path: Path, timeout: float = PAUSE_WAIT_S, proc: Any = None) -> None:
    """Until ``path`` exists: another process's word that it may go on. ``proc``, a
    ``Popen`` that is to create it, failing first fails the wait with its output."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended ({proc.returncode}) before {path}: "
                                 f"{out[-2000:]}{err[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def pause(where: Path | None) -> None:
    if where is None:
        return
    where.with_suffix(".reached").touch()
    wait_for(where.with_suffix(".go"))


class PausingBackend(LocalBackend):
    """A local store that stops once at the point ``pause_at`` names (see the module)."""

    pause_at: str | None = None
    pause_file: Path | None = None

    async def _stop(self, point: str) -> None:
        if self.pause_at == point and self.pause_file is not None:
            import anyio.to_thread

            self.pause_at = None  # once
            await anyio.to_thread.run_sync(pause, self.pause_file)

    async def confirm(self, key: str, size: int, sha256: str, local: str | bytes
                      ) -> str | None:
        why = await super().confirm(key, size, sha256, local)
        if why is None:
            await self._stop("saver:confirmed")
        return why

    async def put_file(self, key: str, path: str, size: int) -> str:
        if key.endswith("/big.bin"):
            await self._stop("saver:big")
        return await super().put_file(key, path, size)

    async def put_bytes(self, key: str, data: bytes) -> None:
        if key.endswith("/big.bin"):  # small enough that save() read it into memory
            await self._stop("saver:big")
        await super().put_bytes(key, data)

    async def list_objects(self, prefix: str) -> list[Any]:
        out = await super().list_objects(prefix)
        if prefix.endswith("/locks/"):
            await self._stop("saver:listed-locks")
        return out

    async def delete_keys(self, keys: Any) -> list[tuple[str, str]]:
        if any("/data/" in k for k in keys):
            await self._stop("pruner:delete-data")
        return await super().delete_keys(keys)


def engine(store: str, work: Path, cfg: dict[str, Any]) -> Engine:
    if cfg.get("endpoint"):  # the S3 server's bucket ``store``; no pauses there
        from s3server import S3Server
        from treekit import s3_engine

        return s3_engine(S3Server(cfg["endpoint"], None), work, store)  # type: ignore[arg-type]
    PausingBackend.pause_at = cfg.get("pause_at")
    PausingBackend.pause_file = Path(cfg["pause"]) if cfg.get("pause") else None

    def factory(ctx: TransferContext) -> LocalBackend:
        return PausingBackend(store, ctx)

    return Engine(factory, Settings(), snapshot_dir=str(work / "snapshots"),
                  log=lambda m: print(m, file=sys.stderr, flush=True))


def write_tree(src: Path, files: dict[str, bytes]) -> None:
    src.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (src / name).write_bytes(data)


def save(eng: Engine, src: Path, run_id: str, task: str, *, name: str = "ck",
         metadata: dict[str, Any] | None = None, latest: bool = True) -> Any:
    cid = new_checkpoint_id(task, 0)
    req = SaveRequest(source=str(src), keys=CheckpointKeys(SCOPE.prefix, run_id, cid),
                      name=name, latest=latest, metadata=metadata or {},
                      identity={"task_id": task, "attempt": 0},
                      reference={"scope": SCOPE.prefix, "created_on": "now"})
    handle = eng.save(req)
    with contextlib.suppress(CheckpointError):  # the caller looks at its state
        handle.wait()
    return handle


def loads(eng: Engine, keys: CheckpointKeys, dest: Path) -> str:
    """"ok" if the checkpoint loads byte-exact, "gone" if its manifest is gone (pruned),
    else why it does not."""
    m = eng.read_manifest(keys)
    if m is None:
        return "gone"
    try:
        eng.load(m, str(dest), keys=keys)
    except CheckpointError as e:
        if eng.read_manifest(keys) is None:
            return "gone"  # pruned while it was read
        return f"load failed: {e}"
    for f in m.files:
        got = hashlib.sha256((dest / f.path).read_bytes()).hexdigest()
        if got != f.sha256:
            return f"{f.path} differs"
    return "ok"


def newest(eng: Engine) -> tuple[CheckpointKeys, Manifest] | None:
    entry = Catalog(eng).latest(SCOPE.prefix)
    return None if entry is None else (entry.keys, entry.manifest)


# -- what a process does ---------------------------------------------------------------


def run_saver(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Resume from the checkpoint ``base`` (a manifest key) and save again with ``big.bin``
    unchanged: the save points at the base's object."""
    eng = engine(cfg["store"], work, cfg)
    if cfg.get("base"):  # as a task that loaded it at its start: read before it went
        keys = CheckpointKeys.from_manifest_key(cfg["base"])
        manifest = Manifest.from_json(Path(cfg["base_copy"]).read_bytes())
        eng.set_base(keys, manifest)
    src = work / "src"
    write_tree(src, {"big.bin": bytes.fromhex(cfg["big_hex"]) * cfg["big_repeat"],
                     "small.txt": os.urandom(16)})
    handle = save(eng, src, cfg["run_id"], "8")
    out: dict[str, Any] = {"state": handle.state.value}
    mine = CheckpointKeys(SCOPE.prefix, cfg["run_id"], handle.checkpoint_id)
    out["manifest"] = mine.manifest
    out["loads"] = loads(eng, mine, work / "loaded")
    m = eng.read_manifest(mine)
    out["pointers"] = {f.path: f.key for f in m.files} if m else None
    eng.close()
    return out


def run_pruner(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    if cfg.get("clock_ahead_s"):  # a host whose clock runs ahead
        real = time.time
        ahead = float(cfg["clock_ahead_s"])
        time.time = lambda: real() + ahead  # type: ignore[assignment]
    eng = engine(cfg["store"], work, cfg)
    kwargs: dict[str, Any] = {}
    if cfg.get("grace_s") is not None:
        kwargs["grace_s"] = float(cfg["grace_s"])
    report = prune(Catalog(eng), SCOPE.prefix, RetentionPolicy(keep_last=cfg["keep_last"]),
                   **kwargs)
    eng.close()
    return {"deleted": report.checkpoints_deleted, "objects": report.objects_deleted,
            "debris": report.debris_removed, "errors": report.errors}


def run_soak_saver(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Save until the deadline, each save resuming from the scope's newest checkpoint
    (whoever saved it), with a big file that never changes: most saves point at objects
    of checkpoints that the pruners are deleting."""
    eng = engine(cfg["store"], work, cfg)
    big = hashlib.sha256(b"soak").digest() * (cfg["big_bytes"] // 32)
    src = work / "src"
    deadline = time.monotonic() + cfg["seconds"]
    saves = pointed = 0
    problems: list[str] = []
    while time.monotonic() < deadline:
        found = newest(eng)
        if found is not None:
            eng.set_base(*found)
        write_tree(src, {"big.bin": big, "small.bin": os.urandom(64)})
        handle = save(eng, src, cfg["run_id"], cfg["task"])
        saves += 1
        if handle.state.value != "committed":
            problems.append(f"save {saves}: {handle.state.value}: {handle.error}")
            continue
        mine = CheckpointKeys(SCOPE.prefix, cfg["run_id"], handle.checkpoint_id)
        m = eng.read_manifest(mine)
        if m is not None and any(f.key is not None for f in m.files):
            pointed += 1
        result = loads(eng, mine, work / f"load{saves % 2}")
        if result not in ("ok", "gone"):
            problems.append(f"save {saves} ({mine.manifest}): {result}")
    eng.close()
    return {"saves": saves, "pointed": pointed, "problems": problems}


def run_soak_pruner(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    eng = engine(cfg["store"], work, cfg)
    deadline = time.monotonic() + cfg["seconds"]
    prunes = deleted = 0
    errors: list[str] = []
    while time.monotonic() < deadline:
        report = prune(Catalog(eng), SCOPE.prefix, RetentionPolicy(keep_last=1),
                       grace_s=cfg["grace_s"])
        prunes += 1
        deleted += report.checkpoints_deleted
        errors.extend(report.errors)
    eng.close()
    return {"prunes": prunes, "deleted": deleted, "errors": errors}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    work = Path(cfg["work"])
    work.mkdir(parents=True, exist_ok=True)
    role = {"saver": run_saver, "pruner": run_pruner, "soak-saver": run_soak_saver,
            "soak-pruner": run_soak_pruner}[cfg["role"]]
    print("RESULT " + json.dumps(role(cfg, work)), flush=True)


if __name__ == "__main__":
    main()
