"""Azure blocks go through the upload worker process, which is restarted, not mourned
(against Azurite).

The worker process, its planes and their restart rules are shared with S3
(test_worker_restart.py); what is Azure's own is checked here: the blocks' bytes are read
in the worker, not in the task's process; a worker killed while it holds blocks is
replaced, the blocks are sent again, and the blob committed holds the file's bytes with
the file's Content-MD5 and SHA-256, though the running digests died with the worker.
A small file's one Put Blob is the worker's too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import metaflow  # noqa: F401  Metaflow loads the extension before its modules are imported
import pytest
from azure.core.exceptions import HttpResponseError, ServiceResponseError
from workerkit import alive

from uploader.backends import TransferContext
from uploader.backends.azure import AzureBackend
from uploader.backends.azure.dataplane import _portable
from uploader.backends.azure.errors import is_transient
from uploader.backends.plane.planes import ProcessPlane
from uploader.config import MiB, Settings, UploaderMode
from uploader.retry import RetryPolicy

pytestmark = pytest.mark.azure


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def opened(azure: Any, log: list[str]) -> AsyncIterator[AzureBackend]:
    ctx = TransferContext(
        settings=Settings(part_size=5 * MiB, multipart_threshold=5 * MiB,
                          upload_concurrency=4, uploader=UploaderMode.PROCESS),
        limiter=anyio.CapacityLimiter(4),
        retry=RetryPolicy(max_attempts=4, deadline=60, initial_backoff=0.01),
        log=log.append)
    b = AzureBackend(ctx, account_url=azure.azurite.account_url, container=azure.container,
                     prefix="metaflow", credential=azure.azurite.credential(),
                     verify=azure.azurite.ca_bundle)
    try:
        yield b
    finally:
        await b.aclose()


def _plane(b: AzureBackend) -> ProcessPlane:
    plane = b._plane
    assert isinstance(plane, ProcessPlane)
    return plane


def _bytes_read(pid: int | str) -> int:
    """Bytes ``pid`` has read with read-like system calls (files, sockets, pipes)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/io")


class _SendFailed(OSError):
    """A transport error that holds the request's body, as requests' errors do."""

    def __init__(self, body: memoryview) -> None:
        super().__init__("connection reset while sending")
        self.body = body


def _raised_while_handling(make: Any) -> tuple[BaseException, BaseException]:
    """An error the SDK raised while handling a transport error (as the data plane meets
    it), and what the data plane hands the coordinator, made where the plane makes it."""
    try:
        raise _SendFailed(memoryview(bytearray(16)))
    except _SendFailed:
        try:
            raise make()  # the SDK's errors keep the exception being handled
        except BaseException as e:
            return e, _portable(e)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("make", [
    lambda: ServiceResponseError("connection reset"),
    lambda: _status(HttpResponseError(message="busy"), 503, "ServerBusy"),
    lambda: _status(HttpResponseError(message="refused"), 403, "AuthorizationFailure"),
    lambda: _SendFailed(memoryview(b"x")),
])
def test_errors_cross_to_the_coordinator_as_the_retry_predicate_saw_them(make: Any) -> None:
    raised, portable = _raised_while_handling(make)
    crossed = pickle.loads(pickle.dumps(portable))
    assert str(raised) in str(crossed)
    if isinstance(raised, _SendFailed):  # a reset: retried, like the builtin one
        assert isinstance(crossed, ConnectionError) and is_transient(crossed)
    else:
        assert type(crossed) is type(raised)
        assert is_transient(crossed) is is_transient(raised)
    if isinstance(raised, HttpResponseError):
        assert (crossed.status_code, crossed.error_code) == (  # type: ignore[attr-defined]
            raised.status_code, raised.error_code)  # type: ignore[attr-defined]


def _status(e: HttpResponseError, status: int, code: str) -> HttpResponseError:
    e.status_code, e.error_code = status, code  # type: ignore[attr-defined]
    return e


def _check_blob(azure: Any, data: bytes, name: str = "metaflow/ck/f") -> None:
    blob = azure.client().get_blob_client(name)
    assert blob.download_blob().readall() == data
    props = blob.get_blob_properties()
    assert bytes(props.content_settings.content_md5) == hashlib.md5(data).digest()
    assert list(azure.client().list_blobs(include=["uncommittedblobs"])) == \
        list(azure.client().list_blobs())  # nothing left staged


@pytest.mark.anyio
async def test_blocks_are_read_hashed_and_sent_by_the_worker_process(
        azure: Any, tmp_path: Path) -> None:
    size = 24 * MiB + 3  # five blocks
    data = os.urandom(size)
    src = tmp_path / "f"
    src.write_bytes(data)
    log: list[str] = []
    async with opened(azure, log) as b:
        await b.put_file("warm", str(src), 6 * MiB)  # starts the worker
        worker = _plane(b).worker
        assert worker is not None
        ours, theirs = _bytes_read("self"), _bytes_read(worker.pid)
        digest = await b.put_file("ck/f", str(src), size)
        small = await b.put_file("ck/small", str(src), 4 * MiB)  # one Put Blob
        ours, theirs = _bytes_read("self") - ours, _bytes_read(worker.pid) - theirs
        # An unchanged file's check is read there too.
        assert await b.digest_file(str(src), size) == hashlib.sha256(data).hexdigest()
        assert _plane(b).hashed_by == worker.pid and _plane(b).worker is worker
    assert digest == hashlib.sha256(data).hexdigest()
    assert small == hashlib.sha256(data[:4 * MiB]).hexdigest()
    # The files' bytes were read by the worker; this process read replies, not blocks.
    assert theirs >= size + 4 * MiB, (theirs, size)
    assert ours < size // 4, (ours, size)
    _check_blob(azure, data)
    _check_blob(azure, data[:4 * MiB], "metaflow/ck/small")
    assert not any("upload worker" in line for line in log), log


@pytest.mark.anyio
async def test_killed_while_holding_blocks_the_worker_is_replaced_and_the_blob_is_right(
        azure: Any, tmp_path: Path) -> None:
    size = 20 * MiB  # four blocks: every slot of the limiter
    data = os.urandom(size)
    src = tmp_path / "f"
    src.write_bytes(data)
    log: list[str] = []
    async with opened(azure, log) as b:
        await b.put_file("warm", str(src), 6 * MiB)
        first = _plane(b).worker
        assert first is not None
        os.kill(first.pid, signal.SIGSTOP)  # holds whatever it is sent
        digest: list[str] = []

        async def put() -> None:
            digest.append(await b.put_file("ck/f", str(src), size))

        with anyio.fail_after(120):  # a hang fails the test instead of stalling it
            async with anyio.create_task_group() as tg:
                tg.start_soon(put)
                while first.held < 4:  # every block of the file sent to the stopped worker
                    await anyio.sleep(0.01)
                os.kill(first.pid, signal.SIGKILL)
        second = _plane(b).worker
    # Its running digests died with it: the file was read again, each block checked
    # against the MD5 it was sent with.
    assert digest == [hashlib.sha256(data).hexdigest()]
    assert second is not None and second.pid != first.pid and not alive(first.pid)
    _check_blob(azure, data)
    assert any(f"(pid {first.pid}) was killed by SIGKILL" in line and "retried" in line
               for line in log), log
