"""The process the prune crash test kills: plans and executes one prune, dying at an op.

Run as ``python prunekit.py '<json config>'``. It counts operations (before and after each
backend delete request; on the local store also each unlink, rmdir and fsync) and
SIGKILLs itself at ``kill_op``; without one it prints ``OPS <n>`` and ``DONE``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    tmp = Path(cfg["tmp"])
    from crashkit import Killer
    from treekit import local_engine, s3_engine

    from uploader import RetentionPolicy, execute_prune, plan_prune
    from uploader.catalog import Catalog
    from uploader.config import UploaderMode

    if cfg["kind"] == "local":
        engine = local_engine(tmp)
    else:
        from s3server import S3Server

        engine = s3_engine(S3Server(cfg["endpoint"], None), tmp,  # type: ignore[arg-type]
                           cfg["bucket"], uploader=UploaderMode.THREAD)
    killer = Killer(cfg.get("kill_op"))
    backend = engine.backend
    killer.wrap_async(backend, "delete_keys")
    if cfg["kind"] == "local":
        for name in ("unlink", "rmdir", "fsync"):
            killer.wrap_sync(os, name)
    catalog = Catalog(engine)
    plan = plan_prune(catalog, cfg["scope"], RetentionPolicy(keep_last=cfg["keep_last"]))
    report = execute_prune(catalog, plan)
    assert not report.errors, report.errors
    print(f"OPS {killer.count}", flush=True)
    engine.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
