"""The upload worker process is restarted, not mourned (real S3-compatible server).

A worker that is killed (SIGKILL, as the out-of-memory killer does) is reaped and replaced,
and the requests it held are retried; one that stops answering (SIGSTOP) is killed after a
deadline derived from the request's size, and the limiter slots its requests hold are
given back; after repeated deaths the task's uploads go on in threads, said once. Through
all of it a multipart file's digest stays that of the bytes stored.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from faultproxy import FaultProxy
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, running_s3_server
from treekit import read_tree
from workerkit import alive, gone_within, workers_of

from uploader.backends import S3Backend, TransferContext
from uploader.backends.plane.planes import MAX_DEATHS, ProcessPlane
from uploader.config import GiB, MiB, Settings, UploaderMode
from uploader.engine import Engine, SaveRequest
from uploader.handle import CheckpointState
from uploader.layout import CheckpointKeys, Scope, new_checkpoint_id
from uploader.retry import RetryPolicy

pytestmark = pytest.mark.s3

BUCKET = "ckpt-restart"
PARTS = "partNumber="
FALLBACK = "threads of the task's process"


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with running_s3_server() as srv:
        yield srv


@pytest.fixture
def s3(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    server.reset()
    server.client().create_bucket(Bucket=BUCKET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    return server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


SMALL = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB, "upload_concurrency": 4,
         "uploader": UploaderMode.PROCESS}
# A deadline of about two seconds for a 5 MiB part (a busy machine's requests take well
# under that): set through the settings, never waited for otherwise.
TIGHT = {"worker_timeout": 2.0, "worker_min_rate": GiB}


def _backend(endpoint: str, log: list[str], **settings: Any) -> S3Backend:
    ctx = TransferContext(settings=Settings(**{**SMALL, **settings}),
                          limiter=anyio.CapacityLimiter(4),
                          retry=RetryPolicy(max_attempts=4, deadline=60, initial_backoff=0.01),
                          log=log.append)
    return S3Backend(ctx, bucket=BUCKET, prefix="p", endpoint_url=endpoint)


def _plane(b: S3Backend | Engine) -> ProcessPlane:
    backend = b.backend if isinstance(b, Engine) else b
    plane = backend._plane  # type: ignore[attr-defined]
    assert isinstance(plane, ProcessPlane)
    return plane


def _worker_pid(b: S3Backend | Engine) -> int:
    w = _plane(b).worker
    assert w is not None
    return w.pid


def _check_no_uploads_left(s3: S3Server) -> None:
    assert s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


@pytest.mark.anyio
async def test_killed_mid_upload_the_worker_is_replaced_and_the_file_digest_is_right(
        s3: S3Server, tmp_path: Path) -> None:
    data = os.urandom(12 * MiB + 5)
    src = tmp_path / "f"
    src.write_bytes(data)
    log: list[str] = []
    with FaultProxy(s3.endpoint) as proxy:
        b = _backend(proxy.endpoint, log)
        hold = proxy.hold(method="PUT", query_contains=PARTS)
        try:
            async with anyio.create_task_group() as tg:
                digest: list[str] = []

                async def put() -> None:
                    digest.append(await b.put_file("k", str(src), len(data)))

                tg.start_soon(put)
                # All three parts read, hashed into the worker's running digest, and sent.
                assert await anyio.to_thread.run_sync(hold.wait_held, 3)
                first = _worker_pid(b)
                os.kill(first, signal.SIGKILL)
                hold.release()
            second = _worker_pid(b)
        finally:
            hold.release()
            await b.aclose()
    # The digest died with the first worker: computed again from the stored parts.
    assert digest == [hashlib.sha256(data).hexdigest()]
    assert second != first and not alive(first)  # reaped: not even a zombie
    stored = s3.client().get_object(Bucket=BUCKET, Key="p/k")["Body"].read()
    assert stored == data
    _check_no_uploads_left(s3)
    assert any(f"(pid {first}) was killed by SIGKILL" in line and "retried" in line
               for line in log), log


@pytest.mark.anyio
async def test_a_stopped_worker_is_killed_at_its_deadline_and_gives_its_slots_back(
        s3: S3Server, tmp_path: Path) -> None:
    data = os.urandom(20 * MiB)  # four parts: every slot of the limiter
    src = tmp_path / "f"
    src.write_bytes(data)
    log: list[str] = []
    b = _backend(s3.endpoint, log, **TIGHT)
    try:
        await b.put_file("warm", str(src), MiB)
        stopped = _worker_pid(b)
        os.kill(stopped, signal.SIGSTOP)
        keys: list[list[str]] = []
        with anyio.fail_after(60):  # a hang fails the test instead of stalling it
            async with anyio.create_task_group() as tg:
                tg.start_soon(b.put_file, "k", str(src), len(data))
                while b._ctx.limiter.borrowed_tokens < 4:  # every part sent to the worker
                    await anyio.sleep(0.01)
                # Needs a slot the stopped worker's requests hold until it is killed.
                tg.start_soon(_list_into, b, keys)
        now = _plane(b).worker
        assert now is None or now.pid != stopped
    finally:
        await b.aclose()
    assert gone_within(stopped, 10)  # killed (a stopped process dies of SIGKILL) and reaped
    assert s3.client().get_object(Bucket=BUCKET, Key="p/k")["Body"].read() == data
    assert keys and "k" not in keys[0]  # listed while the upload was still pending
    assert any(f"(pid {stopped}) left a request of" in line and "was killed" in line
               for line in log), log


async def _list_into(b: S3Backend, out: list[list[str]]) -> None:
    out.append(await b.list_keys(""))


def _save(engine: Engine, src: Path, run: str) -> tuple[Any, CheckpointKeys]:
    keys = CheckpointKeys(Scope("F", "user:me", "s").prefix, run, new_checkpoint_id("1", 0))
    h = engine.save(SaveRequest(source=str(src), keys=keys, name="c", latest=True,
                                metadata={}, identity={}, reference={}))
    return h, keys


def _loaded(engine: Engine, keys: CheckpointKeys, dest: Path) -> dict[str, bytes]:
    m = engine.read_manifest(keys)
    assert m is not None
    engine.load(m, str(dest))
    return read_tree(dest)


def test_repeated_deaths_fall_back_to_threads_said_once(s3: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "staging"
    src.mkdir()
    # Two parts of 5 MiB, no more: each worker holds exactly two, so the count of held
    # requests says which worker sent the last two (10 MiB + 1 byte was three parts).
    (src / "model.bin").write_bytes(os.urandom(10 * MiB))
    (src / "step.txt").write_bytes(b"1")
    log: list[str] = []
    with FaultProxy(s3.endpoint) as proxy:
        engine = Engine(lambda ctx: S3Backend(ctx, bucket=BUCKET, prefix="m",
                                              endpoint_url=proxy.endpoint),
                        Settings(**SMALL), snapshot_dir=str(tmp_path / "snap"),
                        log=log.append)
        hold = proxy.hold(method="PUT", query_contains=PARTS)
        try:
            h, keys = _save(engine, src, "1")
            killed = []
            for death in range(1, MAX_DEATHS + 1):
                # Both parts held on this worker (earlier workers' copies stay held too).
                assert hold.wait_held(2 * death, timeout=60)
                killed.append(_worker_pid(engine))
                os.kill(killed[-1], signal.SIGKILL)
            hold.release()
            h.wait(timeout=60)
            assert h.state is CheckpointState.COMMITTED, h.error
            assert _plane(engine).in_threads
            (src / "step.txt").write_bytes(b"2")
            (src / "model.bin").write_bytes(os.urandom(10 * MiB + 2))
            h2, keys2 = _save(engine, src, "2")
            h2.wait(timeout=60)
            assert h2.state is CheckpointState.COMMITTED, h2.error
            assert workers_of(os.getpid()) == []  # no worker was started again
            assert _loaded(engine, keys2, tmp_path / "out2") == read_tree(src)
            first = _loaded(engine, keys, tmp_path / "out1")  # verified against its digest
            assert first["step.txt"] == b"1"
        finally:
            hold.release()
            engine.close()
    said = [line for line in log if FALLBACK in line]
    assert len(said) == 1 and f"(pid {killed[-1]})" in said[0], log
    assert len([line for line in log if "was killed by SIGKILL" in line]) == MAX_DEATHS
    assert not any(alive(pid) for pid in killed)
    _check_no_uploads_left(s3)
