"""The upload worker process (METAFLOW_CHECKPOINT_UPLOADER=process): its settings, and its
life cycle against a real S3-compatible server.

The worker is a fresh interpreter started by the S3 backend on the engine's event loop; it
reads, hashes and sends part bodies while the loop coordinates. These tests check how it
starts, that it holds none of the task's descriptors, that its stderr reaches the task's
log, and that it never outlives the task's process however that ends. What happens when
the worker itself dies or stops is in test_worker_restart.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from faultproxy import FaultProxy
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, running_s3_server
from workerkit import descriptors, gone_within

from uploader.backends import S3Backend, TransferContext
from uploader.backends.plane.jobs import WorkerGone
from uploader.backends.plane.planes import ProcessPlane
from uploader.config import GiB, MiB, Settings, UploaderMode, parse_settings
from uploader.engine import Engine, SaveRequest
from uploader.errors import ConfigError, UploadError
from uploader.handle import CheckpointState
from uploader.layout import CheckpointKeys, Scope, new_checkpoint_id
from uploader.retry import RetryPolicy

BUCKET = "ckpt-worker"
PARTS = "partNumber="


def test_uploader_setting() -> None:
    assert Settings().uploader is UploaderMode.PROCESS  # the default, chosen by the numbers
    assert parse_settings({"UPLOADER": " Thread "}).uploader is UploaderMode.THREAD
    assert parse_settings({"UPLOADER": "process"}).uploader is UploaderMode.PROCESS
    with pytest.raises(ConfigError, match=r"METAFLOW_CHECKPOINT_UPLOADER='fork'.*thread, "
                                          r"process"):
        parse_settings({"UPLOADER": "fork"}, prefix="METAFLOW_CHECKPOINT_")


def test_worker_deadline_settings() -> None:
    s = parse_settings({"WORKER_TIMEOUT": "2.5", "WORKER_MIN_RATE": "64MiB"})
    assert (s.worker_timeout, s.worker_min_rate) == (2.5, 64 * MiB)
    assert (Settings().worker_timeout, Settings().worker_min_rate) == (0.0, 2 * MiB)
    with pytest.raises(ConfigError, match=r"METAFLOW_CHECKPOINT_WORKER_TIMEOUT='-1'.*0\.\.86400"):
        parse_settings({"WORKER_TIMEOUT": "-1"}, prefix="METAFLOW_CHECKPOINT_")
    with pytest.raises(ConfigError, match=r"METAFLOW_CHECKPOINT_WORKER_MIN_RATE='fast'.*1KiB"):
        parse_settings({"WORKER_MIN_RATE": "fast"}, prefix="METAFLOW_CHECKPOINT_")


def test_deadline_grows_with_the_request_and_defaults_to_the_client_timeouts() -> None:
    from uploader.backends.s3.dataplane import ClientSpec

    spec = ClientSpec(endpoint_url=None, region=None, verify=True, s3_options={},
                      connect_timeout=10, read_timeout=120)
    plane = ProcessPlane(spec, 16)  # never started: nothing runs until a request
    assert plane.deadline(0) == 130
    assert plane.deadline(16 * MiB) == 130 + 16 * 16 / 2  # 16 requests share 2 MiB/s
    tight = ProcessPlane(spec, 4, timeout=1, min_rate=GiB)
    assert tight.deadline(5 * MiB) == pytest.approx(1 + 20 / 1024)


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


def _backend(s3: S3Server, *, endpoint: str | None = None,
             log: list[str] | None = None) -> S3Backend:
    ctx = TransferContext(
        settings=Settings(part_size=5 * MiB, multipart_threshold=5 * MiB, upload_concurrency=4,
                          uploader=UploaderMode.PROCESS),
        limiter=anyio.CapacityLimiter(4),
        retry=RetryPolicy(max_attempts=2, deadline=30, initial_backoff=0.01),
        log=(log if log is not None else []).append)
    return S3Backend(ctx, bucket=BUCKET, prefix="p", endpoint_url=endpoint or s3.endpoint)


def _worker(b: S3Backend) -> subprocess.Popen[bytes]:
    plane = b._plane
    assert isinstance(plane, ProcessPlane) and plane.worker is not None
    return plane.worker._proc


@pytest.mark.s3
@pytest.mark.anyio
async def test_worker_is_a_fresh_interpreter_that_holds_none_of_the_tasks_descriptors(
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
        assert argv[1:3] == [b"-m", b"uploader.backends.plane.worker"]
        # Neither this process's stdout nor its stderr: a task that dies must close them.
        ours = {os.readlink(f"/proc/self/fd/{fd}") for fd in (1, 2)}
        assert not ours & descriptors(proc.pid)
        assert os.readlink(f"/proc/{proc.pid}/fd/1") == "/dev/null"
        os.kill(proc.pid, signal.SIGINT)  # a Ctrl-C reaches the process group: ignored
        os.kill(proc.pid, signal.SIGTERM)  # so is a preemption notice: the task drains first
        await b.put_file("k2", str(src), 12 * MiB)
        assert proc.poll() is None
    finally:
        await b.aclose()
    assert proc.wait(10) == 0  # its input closed: it left


class _OnlyHere:
    """Pickles here; the worker cannot import this test module, so unpickling it fails."""


@pytest.mark.s3
@pytest.mark.anyio
async def test_what_the_worker_writes_to_stderr_reaches_the_log(s3: S3Server,
                                                                tmp_path: Any) -> None:
    src = tmp_path / "f"
    src.write_bytes(os.urandom(MiB))
    log: list[str] = []
    b = _backend(s3, log=log)
    try:
        await b.put_file("k", str(src), MiB)
        plane = b._plane
        assert isinstance(plane, ProcessPlane) and plane.worker is not None
        worker = plane.worker
        with pytest.raises(WorkerGone, match=r"exited with code 1"):
            await worker.submit("run", _OnlyHere())  # the worker dies of a traceback
        await b.put_file("k", str(src), MiB)  # and the next request starts a new one
    finally:
        await b.aclose()
    said = "\n".join(log)
    assert f"upload worker (pid {worker.pid}): Traceback" in said, said
    assert "ModuleNotFoundError" in said
    assert f"the upload worker process (pid {worker.pid}) exited with code 1" in said


@pytest.mark.s3
@pytest.mark.anyio
async def test_closing_ends_the_worker_at_once_even_mid_request(s3: S3Server,
                                                                tmp_path: Any) -> None:
    """End of input: the worker leaves without finishing what it holds."""
    src = tmp_path / "f"
    src.write_bytes(os.urandom(6 * MiB))
    with FaultProxy(s3.endpoint) as proxy:
        b = _backend(s3, endpoint=proxy.endpoint)
        hold = proxy.hold(method="PUT", query_contains=PARTS)
        failed: list[BaseException] = []

        async def put() -> None:
            try:
                await b.put_file("k", str(src), 6 * MiB)
            except UploadError as e:
                failed.append(e)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(put)
                assert await anyio.to_thread.run_sync(hold.wait_held, 2)
                proc = _worker(b)
                await b.aclose()
            # Exited by itself: a worker that finished its requests first would still be
            # waiting for the held reply when the close gives up and kills it.
            assert proc.returncode == 0
            assert len(failed) == 1 and "was closed" in str(failed[0])
        finally:
            hold.release()
            await b.aclose()


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


@pytest.mark.s3
def test_worker_dies_with_a_killed_task_even_mid_request_with_its_input_held_open(
        s3: S3Server, tmp_path: Any) -> None:
    """SIGKILL the task's process while its worker waits on a reply that never comes, with
    another process holding the worker's input open: the parent-death signal ends it."""
    src = tmp_path / "f"
    src.write_bytes(os.urandom(10 * MiB))
    with FaultProxy(s3.endpoint) as proxy:
        hold = proxy.hold(method="PUT", query_contains=PARTS)
        script = textwrap.dedent(f"""
            import subprocess, sys, anyio
            from uploader.backends import S3Backend, TransferContext
            from uploader.config import MiB, Settings
            from uploader.retry import RetryPolicy

            async def main():
                ctx = TransferContext(settings=Settings(part_size=5 * MiB,
                                                        multipart_threshold=5 * MiB,
                                                        upload_concurrency=2),
                                      limiter=anyio.CapacityLimiter(2),
                                      retry=RetryPolicy(max_attempts=1, deadline=30))
                b = S3Backend(ctx, bucket={BUCKET!r}, prefix="p",
                              endpoint_url={proxy.endpoint!r})
                await b.put_file("warm", {str(src)!r}, MiB)  # starts the worker
                w = b._plane.worker
                helper = subprocess.Popen(
                    [sys.executable, "-c", "import time; time.sleep(600)"],
                    pass_fds=(w._req_fd,))
                print(w.pid, helper.pid, flush=True)
                await b.put_file("big", {str(src)!r}, 10 * MiB)

            anyio.run(main)
        """)
        task = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                text=True, env={**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                                                "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                                                "AWS_DEFAULT_REGION": REGION})
        assert task.stdout is not None
        worker, helper = (int(p) for p in task.stdout.readline().split())
        try:
            assert hold.wait_held(2, timeout=60)  # both parts sent, their replies held
            task.kill()
            task.wait()
            assert gone_within(worker, 30), f"worker {worker} outlived its task"
        finally:
            hold.release()
            os.kill(helper, signal.SIGKILL)
            gone_within(helper, 30)


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
