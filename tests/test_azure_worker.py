"""Azure blocks go through the upload worker process, which is restarted, not mourned
(against Azurite).

The worker process, its planes and their restart rules are shared with S3
(test_worker_restart.py); what is Azure's own is checked here: the blocks' bytes are read
in the worker, not in the task's process; a worker killed while it holds blocks is
replaced, the blocks are sent again, and the blob committed holds the file's bytes with
the file's Content-MD5 and SHA-256, though the running digests died with the worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import metaflow  # noqa: F401  Metaflow loads the extension before its modules are imported
import pytest
from workerkit import alive

from uploader.backends import TransferContext
from uploader.backends.azure import AzureBackend
from uploader.backends.s3_planes import ProcessPlane
from uploader.config import MiB, Settings, UploaderMode
from uploader.retry import RetryPolicy

pytestmark = pytest.mark.azure


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def azure(store_kits: Any, request: pytest.FixtureRequest) -> Any:
    return store_kits.get("azure").fresh(request.node.name)


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


def _check_blob(azure: Any, data: bytes) -> None:
    blob = azure.client().get_blob_client("metaflow/ck/f")
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
        ours, theirs = _bytes_read("self") - ours, _bytes_read(worker.pid) - theirs
        # An unchanged file's check is read there too.
        assert await b.digest_file(str(src), size) == hashlib.sha256(data).hexdigest()
        assert _plane(b).hashed_by == worker.pid and _plane(b).worker is worker
    assert digest == hashlib.sha256(data).hexdigest()
    # The file's bytes were read by the worker; this process read replies, not blocks.
    assert theirs >= size, (theirs, size)
    assert ours < size // 4, (ours, size)
    _check_blob(azure, data)
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
