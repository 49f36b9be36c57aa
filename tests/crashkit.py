"""The process the crash harness kills: saves multi-file, multi-part checkpoints in a loop.

Run as ``python crashkit.py '<json config>'``. It prints ``READY`` once its engine is up,
``COMMITTED <i>`` once save ``i`` is durable (``wait()`` returned), and at the end
``OPS <n>`` (the operations it counted) and ``DONE``. With ``kill_op`` set it SIGKILLs
itself at that operation: before or after a backend request, a rename or an fsync.

On S3 it can SIGKILL its upload worker process instead, and go on: at the operations in
``kill_worker_ops``, and ``kill_worker_after`` seconds after ``READY``. Each such kill prints
``WORKER_KILLED <pid> <requests it held>`` (or ``WORKER_KILLED none`` when no worker was
running then), and the end ``PLANE threads`` if the uploads had fallen back to threads.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

MiB = 1 << 20
SCOPE_ARGS = ("CrashFlow", "user:tester", "train")
# Two multipart files (3 and 2 parts of 5 MiB), small files, an empty one, nesting.
TREE = {
    "model.bin": 11 * MiB + 123,
    "opt/adam.bin": 5 * MiB + 7,
    "opt/step.json": 40,
    "small/a.txt": 200,
    "small/b.txt": 1,
    "small/deep/c.txt": 3000,
    "empty.bin": 0,
}


def content(i: int, name: str) -> bytes:
    """What save ``i`` holds in ``name``: a reader can check any checkpoint it finds."""
    return random.Random(f"{i}/{name}").randbytes(TREE[name])


def expected(i: int) -> dict[str, bytes]:
    return {name: content(i, name) for name in TREE}


def engine_for(cfg: dict[str, Any], tmp: Path) -> Any:
    from treekit import local_engine, s3_engine

    settings = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB,
                "upload_concurrency": 4, "max_pending": 2,
                "max_attempts": cfg.get("max_attempts", 3), "retry_deadline": 30.0}
    if cfg["kind"] == "local":
        return local_engine(tmp, **settings)
    if cfg["kind"] == "azure":
        return azure_engine(cfg, tmp, **settings)
    if cfg["kind"] == "gcs":
        return gcs_engine(cfg, tmp, **settings)
    from s3server import S3Server

    return s3_engine(S3Server(cfg["endpoint"], None), tmp,  # type: ignore[arg-type]
                     cfg["bucket"], **settings)


def azure_engine(cfg: dict[str, Any], tmp: Path, **settings: Any) -> Any:
    """An engine on the Azurite container ``cfg`` names, with the emulator's shared key."""
    from azure.core.credentials import AzureNamedKeyCredential
    from azurite import ACCOUNT, KEY

    from uploader import Engine, Settings
    from uploader.backends.azure import AzureBackend

    def factory(ctx: Any) -> Any:
        return AzureBackend(ctx, account_url=cfg["account_url"], container=cfg["container"],
                            prefix="metaflow", credential=AzureNamedKeyCredential(ACCOUNT, KEY),
                            verify=cfg["ca_bundle"])

    return Engine(factory, Settings(**settings), snapshot_dir=str(tmp / "snapshots"),
                  log=lambda m: None)


def gcs_engine(cfg: dict[str, Any], tmp: Path, **settings: Any) -> Any:
    """An engine on the GCS emulator's bucket ``cfg`` names (no credentials: an emulator)."""
    from uploader import Engine, Settings
    from uploader.backends.gcs import GCSBackend

    def factory(ctx: Any) -> Any:
        return GCSBackend(ctx, bucket=cfg["bucket"], prefix="metaflow",
                          endpoint=cfg["endpoint"])

    return Engine(factory, Settings(**settings), snapshot_dir=str(tmp / "snapshots"),
                  log=lambda m: None)


class Killer:
    """Counts operations; SIGKILLs this process at operation ``at`` (never if None), and
    its upload worker at the operations in ``worker_at``."""

    def __init__(self, at: int | None, worker_at: set[int] | None = None,
                 backend: Any = None) -> None:
        self.at = at
        self.worker_at = worker_at or set()
        self.backend = backend
        self.count = 0
        self._lock = threading.Lock()

    def tick(self) -> None:
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.count in self.worker_at:
            self.kill_worker()

    def kill_worker(self) -> None:
        with self._lock:  # from the timer thread and the loop's thread alike
            plane = getattr(self.backend, "_plane", None)
            worker = None if plane is None else plane.worker
            if worker is None:
                print("WORKER_KILLED none", flush=True)
                return
            held = worker.held
            os.kill(worker.pid, signal.SIGKILL)
            print(f"WORKER_KILLED {worker.pid} {held}", flush=True)

    def kill_worker_after(self, delays: list[float]) -> None:
        """Kill the worker at each of ``delays`` (seconds from now), in a thread."""
        start = time.monotonic()

        def run() -> None:
            for delay in sorted(delays):
                # The seeded kill moments themselves, not a wait for anything.
                time.sleep(max(0.0, start + delay - time.monotonic()))
                self.kill_worker()

        threading.Thread(target=run, daemon=True).start()

    def wrap_sync(self, owner: Any, name: str) -> None:
        real = getattr(owner, name)

        def wrapped(*a: Any, **k: Any) -> Any:
            self.tick()
            out = real(*a, **k)
            self.tick()
            return out

        setattr(owner, name, wrapped)

    def wrap_async(self, owner: Any, name: str) -> None:
        real = getattr(owner, name)

        async def wrapped(*a: Any, **k: Any) -> Any:
            self.tick()
            out = await real(*a, **k)
            self.tick()
            return out

        setattr(owner, name, wrapped)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    tmp = Path(cfg["tmp"])
    from treekit import save_request

    from uploader import Scope

    engine = engine_for(cfg, tmp)
    backend = engine.backend
    killer = Killer(cfg.get("kill_op"), set(cfg.get("kill_worker_ops", ())), backend)
    for name in ("put_file", "put_bytes"):
        killer.wrap_async(backend, name)
    for name in ("replace", "fsync"):
        killer.wrap_sync(os, name)
    staging = tmp / "staging"
    scope = Scope(*SCOPE_ARGS)
    print("READY", flush=True)
    if cfg.get("kill_worker_after"):
        killer.kill_worker_after(cfg["kill_worker_after"])
    handles = []
    for i in range(cfg["saves"]):
        for name, data in expected(i).items():
            p = staging / name
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp_file = p.with_name(p.name + ".new")
            tmp_file.write_bytes(data)
            os.replace(tmp_file, p)  # a new inode: the pending upload keeps its own
        req = save_request(staging, name="mfchckpt", scope=scope, run_id=cfg["run_id"],
                           metadata={"i": i}, attempt=0)
        handles.append((i, engine.save(req)))
        while handles and handles[0][1].done():
            i_done, h = handles.pop(0)
            h.wait(0)
            print(f"COMMITTED {i_done}", flush=True)
    for i_done, h in handles:
        h.wait(120)
        print(f"COMMITTED {i_done}", flush=True)
    plane = getattr(backend, "_plane", None)
    if getattr(plane, "in_threads", False):
        print("PLANE threads", flush=True)
    engine.close()
    print(f"OPS {killer.count}", flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
