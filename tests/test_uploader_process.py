"""The upload worker process (METAFLOW_CHECKPOINT_UPLOADER=process) and its setting.

The worker is a fresh interpreter started by the S3 backend on the engine's event loop;
it reads, hashes and sends part bodies while the loop coordinates. These tests check its
life cycle against a real S3-compatible server: how it starts, that it never outlives the
task's process, and what a task sees when it dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from faultproxy import FaultProxy
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, running_s3_server

from uploader.backends import S3Backend, TransferContext
from uploader.backends.s3_worker import ProcessPlane, WorkerGone
from uploader.config import MiB, Settings, UploaderMode, parse_settings
from uploader.engine import Engine, SaveRequest
from uploader.errors import ConfigError
from uploader.handle import CheckpointState
from uploader.layout import CheckpointKeys, Scope, new_checkpoint_id
from uploader.retry import RetryPolicy

BUCKET = "ckpt-worker"


def test_uploader_setting() -> None:
    assert Settings().uploader is UploaderMode.PROCESS  # the default, chosen by the numbers
    assert parse_settings({"UPLOADER": " Thread "}).uploader is UploaderMode.THREAD
    assert parse_settings({"UPLOADER": "process"}).uploader is UploaderMode.PROCESS
    with pytest.raises(ConfigError, match=r"METAFLOW_CHECKPOINT_UPLOADER='fork'.*thread, "
                                          r"process"):
        parse_settings({"UPLOADER": "fork"}, prefix="METAFLOW_CHECKPOINT_")


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


def _backend(s3: S3Server, *, endpoint: str | None = None) -> S3Backend:
    ctx = TransferContext(
        settings=Settings(part_size=5 * MiB, multipart_threshold=5 * MiB, upload_concurrency=4,
                          uploader=UploaderMode.PROCESS),
        limiter=anyio.CapacityLimiter(4),
        retry=RetryPolicy(max_attempts=2, deadline=30, initial_backoff=0.01))
    return S3Backend(ctx, bucket=BUCKET, prefix="p", endpoint_url=endpoint or s3.endpoint)


def _worker(b: S3Backend) -> subprocess.Popen[bytes]:
    plane = b._plane
    assert isinstance(plane, ProcessPlane) and plane._proc is not None
    return plane._proc


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # polls a condition, with a deadline
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # our own child: reap it, so it does not linger as a zombie
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


@pytest.mark.s3
@pytest.mark.anyio
async def test_worker_is_a_fresh_interpreter_that_ends_with_the_backend(
        s3: S3Server, tmp_path: Any) -> None:
    src = tmp_path / "f"
    src.write_bytes(os.urandom(12 * MiB))
    b = _backend(s3)
    try:
        await b.put_file("k", str(src), 12 * MiB)
        proc = _worker(b)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert argv[0] == sys.executable.encode()  # spawned: exec'd afresh, never a fork
        assert argv[1:3] == [b"-m", b"uploader.backends.s3_worker"]
        os.kill(proc.pid, signal.SIGINT)  # a Ctrl-C reaches the process group: ignored
        os.kill(proc.pid, signal.SIGTERM)  # so is a preemption notice: the task drains first
        await b.put_file("k2", str(src), 12 * MiB)
        assert proc.poll() is None
    finally:
        await b.aclose()
    assert proc.wait(10) == 0  # its input closed: it finished and left


@pytest.mark.s3
@pytest.mark.anyio
async def test_a_worker_that_dies_mid_upload_fails_it_and_the_next_starts_afresh(
        s3: S3Server, tmp_path: Any) -> None:
    src = tmp_path / "f"
    src.write_bytes(os.urandom(12 * MiB))
    with FaultProxy(s3.endpoint) as proxy:
        b = _backend(s3, endpoint=proxy.endpoint)
        hold = proxy.hold(method="PUT", query_contains="partNumber=")
        errors: list[BaseException] = []

        async def put() -> None:
            try:
                await b.put_file("k", str(src), 12 * MiB)
            except WorkerGone as e:
                errors.append(e)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(put)
                assert await anyio.to_thread.run_sync(hold.wait_held, 1)
                first = _worker(b)
                first.kill()
            assert len(errors) == 1 and "worker process exited" in str(errors[0])
            hold.release()
            first.wait()
            await b.put_file("k", str(src), 12 * MiB)  # on a new worker
            assert _worker(b).pid != first.pid
        finally:
            hold.release()
            await b.aclose()
    assert s3.client().head_object(Bucket=BUCKET, Key="p/k")["ContentLength"] == 12 * MiB
    assert s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


@pytest.mark.s3
def test_worker_never_outlives_a_killed_task(s3: S3Server, tmp_path: Any) -> None:
    """SIGKILL the task's process mid-upload: its worker sees its input close and exits."""
    src = tmp_path / "f"
    src.write_bytes(os.urandom(40 * MiB))
    script = textwrap.dedent(f"""
        import os, sys, anyio
        from uploader.backends import S3Backend, TransferContext
        from uploader.config import MiB, Settings, UploaderMode
        from uploader.retry import RetryPolicy

        async def main():
            ctx = TransferContext(settings=Settings(part_size=5 * MiB, upload_concurrency=1,
                                                    uploader=UploaderMode.PROCESS),
                                  limiter=anyio.CapacityLimiter(1),
                                  retry=RetryPolicy(max_attempts=1, deadline=30))
            b = S3Backend(ctx, bucket={BUCKET!r}, prefix="p", endpoint_url={s3.endpoint!r})
            await b.put_file("warm", {str(src)!r}, 40 * MiB)
            print(b._plane._proc.pid, flush=True)
            while True:
                await b.put_file("again", {str(src)!r}, 40 * MiB)

        anyio.run(main)
    """)
    task = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                                 "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                                 "AWS_DEFAULT_REGION": REGION})
    assert task.stdout is not None
    worker = int(task.stdout.readline())
    task.kill()
    task.wait()
    assert _gone_within(worker, 30), f"worker {worker} outlived its task"


@pytest.mark.s3
def test_engine_commits_through_the_worker(s3: S3Server, tmp_path: Any) -> None:
    src = tmp_path / "staging"
    src.mkdir()
    (src / "model.bin").write_bytes(os.urandom(11 * MiB))
    (src / "meta.json").write_bytes(b"{}")
    engine = Engine(lambda ctx: S3Backend(ctx, bucket=BUCKET, prefix="m",
                                          endpoint_url=s3.endpoint),
                    Settings(part_size=5 * MiB, multipart_threshold=5 * MiB,
                             upload_concurrency=4),  # the default: a worker process
                    snapshot_dir=str(tmp_path / "snap"), log=lambda _: None)
    try:
        keys = CheckpointKeys(Scope("F", "user:me", "s").prefix, "1", new_checkpoint_id("1", 0))
        h = engine.save(SaveRequest(source=str(src), keys=keys, name="c", latest=True,
                                    metadata={}, identity={}, reference={}))
        h.wait(timeout=60)
        assert h.state is CheckpointState.COMMITTED
        m = engine.read_manifest(keys)
        assert m is not None
        engine.load(m, str(tmp_path / "out"))
    finally:
        engine.close()
    for name in ("model.bin", "meta.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.s3
@pytest.mark.anyio
async def test_forked_children_do_not_keep_the_worker_alive(s3: S3Server, tmp_path: Any) -> None:
    """A DataLoader-style fork holds copies of the task's descriptors; the worker must still
    see its input close when the task's backend closes."""
    src = tmp_path / "f"
    src.write_bytes(os.urandom(6 * MiB))
    b = _backend(s3)
    r, w = os.pipe()
    child = -1
    try:
        await b.put_file("k", str(src), 6 * MiB)
        proc = _worker(b)
        child = os.fork()
        if child == 0:  # pragma: no cover - the forked child only waits to be released
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        os.close(r)
        await b.aclose()
        assert proc.wait(5) == 0  # ended by its input closing, not killed after a timeout
    finally:
        os.close(w)  # releases the child
        if child > 0:
            os.waitpid(child, 0)
        await b.aclose()
