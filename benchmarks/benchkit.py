"""Engines, clients and requests the benchmarks share (run them as scripts from anywhere:
this directory is on ``sys.path`` then)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any

import boto3
from botocore.config import Config

from uploader import (
    CheckpointHandle,
    CheckpointKeys,
    CheckpointState,
    Engine,
    LocalBackend,
    SaveRequest,
    Scope,
    Settings,
    TransferContext,
    new_checkpoint_id,
)
from uploader.backends.s3 import S3Backend

BUCKET = "bench"
REGION = "us-east-1"
CREDS = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench-secret"}
SCOPE = Scope("Bench", "user:bench", "train")


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int | str, task: int | str | None = None) -> list[str]:
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    with open(path) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()  # fields from 3 (state) on


def tree_cpu(root: int) -> float | None:
    """CPU-seconds (user + system) of ``root`` and its live descendants, from /proc."""
    try:
        stats = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                with contextlib.suppress(OSError):
                    stats[int(name)] = _proc_stat(name)
    except OSError:
        return None  # no /proc: server CPU is not reported
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(int(st[1]), []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += int(stats[pid][11]) + int(stats[pid][12])
        todo.extend(children.get(pid, ()))
    return total / _TICK


def system_busy() -> float | None:
    """CPU-seconds all CPUs spent in processes (user, nice, system) since boot. Interrupt
    and softirq time is left out: loopback networking lands there, for no one process."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return (fields[0] + fields[1] + fields[2]) / _TICK


def others_cpu_share(window: Callable[[], object]) -> tuple[object, float]:
    """Run ``window()``; return its result and the share of the machine's CPUs that
    processes outside this one's tree used meanwhile (0 on a quiet machine, None-safe)."""
    busy0, mine0, t0 = system_busy(), tree_cpu(os.getpid()), time.perf_counter()
    result = window()
    busy1, mine1, t1 = system_busy(), tree_cpu(os.getpid()), time.perf_counter()
    if None in (busy0, busy1, mine0, mine1):
        return result, 0.0
    others = (busy1 - busy0) - (mine1 - mine0)  # type: ignore[operator]
    return result, max(0.0, others) / ((t1 - t0) * (os.cpu_count() or 1))


def raise_priority() -> bool:
    """Run at nice -20 where allowed (root), so that other work on a shared machine barely
    takes our CPUs; threads and processes started later inherit it. False if not allowed."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -20)  # Linux: this thread, inherited by new ones
    except (OSError, AttributeError):
        return False
    return True


def s3_client(url: str, **config: Any) -> Any:
    return boto3.client("s3", endpoint_url=url, region_name=REGION, **CREDS, config=Config(
        s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
        response_checksum_validation="when_required", **config))


def s3_engine(url: str, tmp: str, *, prefix: str = "ours", name: str = "s3",
              **settings: Any) -> Engine:
    def factory(ctx: TransferContext) -> S3Backend:
        return S3Backend(ctx, bucket=BUCKET, prefix=prefix, endpoint_url=url, region=REGION,
                         client_kwargs=dict(CREDS))

    return Engine(factory, Settings(**settings), snapshot_dir=os.path.join(tmp, f"snap-{name}"),
                  log=print)


def local_engine(tmp: str, *, name: str = "local", **settings: Any) -> Engine:
    def factory(ctx: TransferContext) -> LocalBackend:
        return LocalBackend(os.path.join(tmp, f"store-{name}"), ctx)

    return Engine(factory, Settings(**settings), snapshot_dir=os.path.join(tmp, f"snap-{name}"),
                  log=print)


def request(source: str, *, name: str = "bench", run_id: str = "1", latest: bool = True,
            metadata: dict[str, Any] | None = None) -> SaveRequest:
    keys = CheckpointKeys(SCOPE.prefix, run_id, new_checkpoint_id(run_id, 0))
    return SaveRequest(source=source, keys=keys, name=name, latest=latest,
                       metadata=metadata or {}, identity={}, reference={})


def committed(handle: CheckpointHandle) -> None:
    handle.wait()
    assert handle.state is CheckpointState.COMMITTED, handle.state


def empty_bucket(client: Any) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", ()):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])


def timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0
