"""The S3 backend against a real S3-compatible server (moto, in a child process).

Faults are injected by wrapping methods of the backend's one aiobotocore client, so the
requests that do go out are real ones and the server's state is checked with boto3.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import resource
import threading
import urllib.parse
import weakref
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import anyio
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)
from faultproxy import RESET, FaultProxy, error
from hypothesis import given
from hypothesis import strategies as st
from s3server import S3Server, running_s3_server

import uploader.backends.s3.dataplane as dataplane_mod
from uploader.backends import S3Backend, TransferContext
from uploader.backends.s3.backend import MAX_PARTS, is_transient, part_size_for
from uploader.config import GiB, MiB, Settings, UploaderMode
from uploader.engine import Engine, SaveRequest
from uploader.errors import StorageAccessError, UploadError
from uploader.layout import CheckpointKeys, Scope, new_checkpoint_id
from uploader.retry import RetryPolicy

T = TypeVar("T")
BUCKET = "ckpt-test"
PREFIX = "metaflow/checkpoints"


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with running_s3_server() as srv:
        yield srv


@pytest.fixture
def s3(server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> S3Server:
    """A fresh server state with one bucket, and credentials from the environment only."""
    return server.fresh(BUCKET, monkeypatch, tmp_path)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CountingPolicy(RetryPolicy):
    """A retry policy that records every attempt it makes."""

    attempts: list[int] = dataclasses.field(default_factory=list)

    async def call(self, fn: Callable[[], Awaitable[T]], *,
                   is_transient: Callable[[BaseException], bool]) -> T:
        async def counted() -> T:
            self.attempts.append(1)
            return await fn()

        return await super().call(counted, is_transient=is_transient)


def make_ctx(policy: RetryPolicy | None = None, *,
             mode: UploaderMode = UploaderMode.THREAD) -> TransferContext:
    return TransferContext(
        settings=Settings(part_size=5 * MiB, multipart_threshold=5 * MiB, upload_concurrency=4,
                          uploader=mode),
        limiter=anyio.CapacityLimiter(4),
        retry=policy or RetryPolicy(max_attempts=3, deadline=30, initial_backoff=0.01),
    )


@contextlib.asynccontextmanager
async def backend(s3: S3Server, *, bucket: str = BUCKET, prefix: str = PREFIX,
                  policy: RetryPolicy | None = None, mode: UploaderMode = UploaderMode.THREAD,
                  endpoint: str | None = None) -> AsyncIterator[S3Backend]:
    b = S3Backend(make_ctx(policy, mode=mode), bucket=bucket, prefix=prefix,
                  endpoint_url=endpoint or s3.endpoint)
    try:
        yield b
    finally:
        await b.aclose()


@pytest.fixture(params=list(UploaderMode), ids=lambda m: m.value)
def mode(request: pytest.FixtureRequest) -> UploaderMode:
    """Both places the bytes can be moved from: worker threads, a worker process."""
    return UploaderMode(request.param)


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3.endpoint) as p:
        yield p


PART_PUT = {"method": "PUT", "query_contains": "partNumber="}


def write_random(path: Any, size: int) -> str:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def pending_uploads(s3: S3Server) -> list[Any]:
    return list(s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))


def client_error(code: str, status: int, op: str = "PutObject") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"{code} (injected)"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, op)


# -- pure functions ----------------------------------------------------------------


@given(size=st.integers(0, 5 * 1024 * GiB), configured=st.integers(5 * MiB, 5 * GiB))
def test_part_size_keeps_within_s3_limits(size: int, configured: int) -> None:
    part = part_size_for(size, configured)
    assert part >= configured >= 5 * MiB
    assert -(-size // part) <= MAX_PARTS
    if part > configured:  # grown for the part count: whole MiB, and no bigger than needed
        assert part % MiB == 0
        assert -(-size // (part - MiB)) > MAX_PARTS


def test_part_size_examples() -> None:
    assert part_size_for(23 * MiB, 5 * MiB) == 5 * MiB
    assert part_size_for(100 * GiB, 16 * MiB) == 16 * MiB  # 6,400 parts
    assert part_size_for(1024 * GiB, 16 * MiB) == 105 * MiB  # ceil(1 TiB / 10,000) -> MiB


@pytest.mark.parametrize("exc, transient", [
    (client_error("SlowDown", 503), True),
    (client_error("InternalError", 500), True),
    (client_error("ServiceUnavailable", 503), True),
    (client_error("Throttling", 400), True),
    (client_error("ThrottlingException", 400), True),
    (client_error("RequestTimeout", 400), True),
    (client_error("BadGateway", 502), True),
    (client_error("GatewayTimeout", 504), True),
    (client_error("TooManyRequests", 429), True),  # S3-compatible servers throttle so
    (client_error("AccessDenied", 403), False),
    (client_error("NoSuchBucket", 404), False),
    (client_error("NoSuchKey", 404), False),
    (client_error("InvalidAccessKeyId", 403), False),
    (client_error("SignatureDoesNotMatch", 403), False),
    (client_error("RequestTimeTooSkewed", 403), False),  # a retry does not fix the clock
    (client_error("EntityTooSmall", 400), False),
    (client_error("NoSuchUpload", 404), False),
    (EndpointConnectionError(endpoint_url="http://x"), True),
    (ConnectionClosedError(endpoint_url="http://x"), True),
    (ReadTimeoutError(endpoint_url="http://x"), True),
    (ResponseStreamingError(error="reset"), True),
    (aiohttp.ServerDisconnectedError(), True),
    (aiohttp.ClientPayloadError("truncated"), True),
    (aiohttp.ClientOSError(104, "reset"), True),
    (aiohttp.InvalidURL("nope"), False),
    (SSLError(endpoint_url="https://x", error="EOF occurred in violation of protocol"), True),
    (SSLError(endpoint_url="https://x", error="[SSL: CERTIFICATE_VERIFY_FAILED] self-signed"),
     False),
    (TimeoutError(), True),
    (ConnectionResetError(), True),
    (BrokenPipeError(), True),
    (NoCredentialsError(), False),
    (ParamValidationError(report="bad"), False),
    (ValueError("bug"), False),
    (TypeError("bug"), False),
    (KeyError("bug"), False),
    (FileNotFoundError("gone"), False),
])
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_urls_and_keys() -> None:
    ctx = make_ctx()
    b = S3Backend(ctx, bucket="b", prefix="/root/p/")
    assert (b.kind, b.url, b.url_of("x/y")) == ("s3", "s3://b/root/p", "s3://b/root/p/x/y")
    bare = S3Backend(ctx, bucket="b", prefix="")
    assert (bare.url, bare.url_of("x/y")) == ("s3://b", "s3://b/x/y")


# -- against the server ------------------------------------------------------------

@pytest.mark.s3
@pytest.mark.anyio
async def test_small_round_trip(s3: S3Server, mode: UploaderMode,
                                tmp_path: Any) -> None:
    src = tmp_path / "small.bin"
    want = write_random(src, 100_000)
    async with backend(s3, mode=mode) as b:
        assert await b.put_file("ck/small.bin", str(src), 100_000) == want
        client = b._client
        await b.put_bytes("ck/manifest.json", b'{"ok": true}')
        assert await b.get_bytes("ck/manifest.json") == b'{"ok": true}'
        dest = tmp_path / "out" / "deeper" / "small.bin"
        assert await b.get_file("ck/small.bin", str(dest), 100_000) == want
        assert dest.read_bytes() == src.read_bytes()
        assert b._client is client  # one client, reused
    assert os.listdir(dest.parent) == ["small.bin"]  # no temporary left behind
    head = s3.client().head_object(Bucket=BUCKET, Key=f"{PREFIX}/ck/small.bin")
    assert head["ContentLength"] == 100_000 and "-" not in head["ETag"]  # one PutObject


@pytest.mark.s3
@pytest.mark.anyio
async def test_multipart_round_trip(s3: S3Server, mode: UploaderMode,
                                    tmp_path: Any) -> None:
    size = 23 * MiB + 12_345  # five parts of 5 MiB, the last one short
    src = tmp_path / "big.bin"
    want = write_random(src, size)
    async with backend(s3, mode=mode) as b:
        assert await b.put_file("ck/big.bin", str(src), size) == want
        head = s3.client().head_object(Bucket=BUCKET, Key=f"{PREFIX}/ck/big.bin")
        assert head["ContentLength"] == size and head["ETag"].strip('"').endswith("-5")
        dest = tmp_path / "restored" / "big.bin"
        assert await b.get_file("ck/big.bin", str(dest), size) == want
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == want
    assert os.listdir(dest.parent) == ["big.bin"]
    assert pending_uploads(s3) == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_parts_of_all_files_share_the_limiter(s3: S3Server, proxy: FaultProxy,
                                                    tmp_path: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two multipart files at once: never more than 4 parts in flight, nor 4 buffers."""
    sources = []
    for name in ("a", "b"):
        sources.append((tmp_path / name, write_random(tmp_path / name, 16 * MiB)))
    in_flight = peak = live = peak_live = 0
    lock = threading.Lock()  # bodies are made in worker threads and may die in any thread
    real_read, real_run = dataplane_mod.read_part, dataplane_mod.DataPlane.run

    def counting_read(*args: Any) -> Any:
        nonlocal live, peak_live
        body = real_read(*args)
        with lock:
            live += 1
            peak_live = max(peak_live, live)

        def freed() -> None:
            nonlocal live
            with lock:
                live -= 1

        weakref.finalize(body, freed)
        return body

    def counting_run(self: Any, job: Any) -> Any:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            return real_run(self, job)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(dataplane_mod, "read_part", counting_read)
    monkeypatch.setattr(dataplane_mod.DataPlane, "run", counting_run)
    hold = proxy.hold(**PART_PUT)  # parts pile up at the server until released
    async with backend(s3, endpoint=proxy.endpoint) as b:
        digests: dict[str, str] = {}

        async def put(path: Any) -> None:
            digests[path.name] = await b.put_file(path.name, str(path), 16 * MiB)

        async with anyio.create_task_group() as tg:
            for path, _ in sources:
                tg.start_soon(put, path)
            assert await anyio.to_thread.run_sync(hold.wait_held, 4)
            hold.release()
    assert digests == {p.name: want for p, want in sources}
    assert peak == 4
    assert 2 <= peak_live <= 4  # part buffers exist only while their part holds a slot


@pytest.mark.s3
@pytest.mark.anyio
async def test_list_keys_follows_every_page(s3: S3Server) -> None:
    async with backend(s3) as b:
        for i in range(7):
            await b.put_bytes(f"m/{i}", b"")
        client = await b._get_client()
        real = client.get_paginator

        pages: list[int] = []

        class SmallPages:  # pages of 2 keys instead of 1,000, so 7 keys take 4 pages
            def __init__(self, name: str) -> None:
                self.inner = real(name)

            async def paginate(self, **kw: Any) -> AsyncIterator[Any]:
                async for page in self.inner.paginate(PaginationConfig={"PageSize": 2}, **kw):
                    pages.append(len(page.get("Contents", ())))
                    yield page

        client.get_paginator = SmallPages
        assert sorted(await b.list_keys("m/")) == [f"m/{i}" for i in range(7)]
        assert pages == [2, 2, 2, 1]


@pytest.mark.s3
@pytest.mark.anyio
async def test_no_such_bucket_fails_at_once(s3: S3Server, mode: UploaderMode,
                                            tmp_path: Any) -> None:
    src = tmp_path / "f"
    write_random(src, 1000)
    policy = CountingPolicy(max_attempts=5, deadline=30, initial_backoff=0.01)
    async with backend(s3, bucket="ckpt-missing", policy=policy, mode=mode) as b:
        with pytest.raises(StorageAccessError) as info:
            await b.put_file("ck/f", str(src), 1000)
        assert policy.attempts == [1]
        msg = str(info.value)
        assert "ckpt-missing" in msg and "ck/f" in msg
        assert "METAFLOW_DATASTORE_SYSROOT_S3" in msg
        assert info.value.key == "ck/f"
        with pytest.raises(StorageAccessError, match="ckpt-missing"):
            await b.put_bytes("ck/manifest", b"{}")
        assert policy.attempts == [1, 1]


@pytest.mark.s3
@pytest.mark.anyio
async def test_bad_credentials_say_what_to_check(s3: S3Server, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Any) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # don't wait for an instance role
    async with backend(s3) as b:
        with pytest.raises(StorageAccessError, match="no AWS credentials"):
            await b.put_bytes("k", b"x")


@pytest.mark.s3
@pytest.mark.anyio
async def test_transient_part_failure_resends_only_that_part(s3: S3Server, proxy: FaultProxy,
                                                             mode: UploaderMode,
                                                             tmp_path: Any) -> None:
    size = 16 * MiB
    src = tmp_path / "f"
    want = write_random(src, size)
    proxy.add_rule(RESET, method="PUT", query_contains="partNumber=2", times=1)
    async with backend(s3, endpoint=proxy.endpoint, mode=mode) as b:
        assert await b.put_file("ck/f", str(src), size) == want
        parts = sorted(urllib.parse.parse_qs(r.query)["partNumber"][0]
                       for r in proxy.requests if r.method == "PUT" and "partNumber=" in r.query)
        assert parts == ["1", "2", "2", "3", "4"]
        assert proxy.count(action="reset") == 1
        dest = tmp_path / "out"
        assert await b.get_file("ck/f", str(dest), size) == want
    assert pending_uploads(s3) == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_failed_part_aborts_the_upload(s3: S3Server, proxy: FaultProxy, mode: UploaderMode,
                                             tmp_path: Any) -> None:
    size = 23 * MiB
    src = tmp_path / "f"
    write_random(src, size)
    proxy.add_rule(error(403, "AccessDenied"), method="PUT", query_contains="partNumber=3")
    async with backend(s3, endpoint=proxy.endpoint, mode=mode) as b:
        with pytest.raises(StorageAccessError, match=r"s3:PutObject") as info:
            await b.put_file("ck/f", str(src), size)
        assert BUCKET in str(info.value) and "ck/f" in str(info.value)
    assert proxy.count(method="PUT", query_contains="partNumber=3") == 1  # not retried
    # moto may answer the abort with a 500 while a cut part is still arriving: retried.
    assert proxy.count(method="DELETE", query_contains="uploadId=") >= 1
    assert pending_uploads(s3) == []
    assert "Contents" not in s3.client().list_objects_v2(Bucket=BUCKET)


@pytest.mark.s3
@pytest.mark.anyio
async def test_cancelled_upload_is_aborted(s3: S3Server, proxy: FaultProxy, mode: UploaderMode,
                                           tmp_path: Any) -> None:
    """Cancelled while a part is stuck at the server: the part's connection is cut (the
    cancellation does not wait for the server), and the upload is aborted."""
    size = 23 * MiB
    src = tmp_path / "f"
    write_random(src, size)
    hold = proxy.hold(method="PUT", query_contains="partNumber=3")
    try:
        async with backend(s3, endpoint=proxy.endpoint, mode=mode) as b:
            async with anyio.create_task_group() as tg:
                tg.start_soon(b.put_file, "ck/f", str(src), size)
                assert await anyio.to_thread.run_sync(hold.wait_held, 1)
                assert len(pending_uploads(s3)) == 1
                tg.cancel_scope.cancel()
            assert hold.held == 1  # still parked: the cancellation did not wait for it
        assert pending_uploads(s3) == []
    finally:
        hold.release()


@pytest.mark.s3
@pytest.mark.anyio
async def test_unreadable_file_aborts_and_propagates(s3: S3Server, mode: UploaderMode,
                                                     tmp_path: Any) -> None:
    """A file shorter than recorded (truncated under the uploader) is not a storage error:
    it propagates as it is, so the engine can report a torn file."""
    src = tmp_path / "f"
    write_random(src, 12 * MiB)
    async with backend(s3, mode=mode) as b:
        with pytest.raises(EOFError, match="truncated"):
            await b.put_file("ck/f", str(src), 23 * MiB)
    assert pending_uploads(s3) == []


@pytest.mark.s3
@pytest.mark.anyio
@pytest.mark.parametrize("retry_answer", ["server", "NoSuchUpload", "InternalError"])
async def test_lost_complete_response_is_confirmed(s3: S3Server, tmp_path: Any,
                                                   retry_answer: str) -> None:
    """Complete succeeds on the server but its answer is lost. The retry then meets what
    the server says about a finished upload id: moto re-completes it (200), S3 says
    NoSuchUpload, and moto answers 500 for ids it does not know. None may fail the file."""
    size = 12 * MiB
    src = tmp_path / "f"
    want = write_random(src, size)
    async with backend(s3) as b:
        client = await b._get_client()
        real_complete, real_head = client.complete_multipart_upload, client.head_object
        completes = heads = 0

        async def complete(**kw: Any) -> Any:
            nonlocal completes
            completes += 1
            if completes == 1:
                await real_complete(**kw)
                raise ConnectionClosedError(endpoint_url=s3.endpoint)
            if retry_answer == "server":
                return await real_complete(**kw)
            raise client_error(retry_answer, 404 if retry_answer == "NoSuchUpload" else 500,
                               "CompleteMultipartUpload")

        async def head(**kw: Any) -> Any:
            nonlocal heads
            heads += 1
            if heads == 1:  # as if the object were not visible yet: Complete is re-sent
                raise client_error("404", 404, "HeadObject")
            return await real_head(**kw)

        client.complete_multipart_upload = complete
        client.head_object = head
        assert await b.put_file("ck/f", str(src), size) == want
        assert completes == 2 and heads == (1 if retry_answer == "server" else 2)
        assert await b.get_file("ck/f", str(tmp_path / "out"), size) == want
    assert pending_uploads(s3) == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_upload_gone_before_complete_fails(s3: S3Server, tmp_path: Any) -> None:
    """NoSuchUpload with no object behind it (aborted elsewhere) is a failure."""
    src = tmp_path / "f"
    write_random(src, 12 * MiB)
    async with backend(s3) as b:
        client = await b._get_client()
        completes = 0

        async def complete(**kw: Any) -> Any:
            nonlocal completes
            completes += 1
            if completes == 1:
                raise ConnectionClosedError(endpoint_url=s3.endpoint)
            raise client_error("NoSuchUpload", 404, "CompleteMultipartUpload")

        client.complete_multipart_upload = complete
        with pytest.raises(UploadError, match=f"{BUCKET}.*ck/f.*NoSuchUpload"):
            await b.put_file("ck/f", str(src), 12 * MiB)
    assert pending_uploads(s3) == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_exhausted_retries_name_bucket_and_key(s3: S3Server) -> None:
    policy = CountingPolicy(max_attempts=3, deadline=30, initial_backoff=0.001)
    async with backend(s3, policy=policy) as b:
        client = await b._get_client()

        async def put_object(**kw: Any) -> Any:
            raise client_error("SlowDown", 503)

        client.put_object = put_object
        with pytest.raises(UploadError, match=f"{BUCKET}.*ck/m.*SlowDown") as info:
            await b.put_bytes("ck/m", b"{}")
        assert not isinstance(info.value, StorageAccessError)
        assert policy.attempts == [1, 1, 1]


def _b64crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


@pytest.mark.s3
@pytest.mark.anyio
async def test_every_body_carries_the_checksum_s3_verifies(s3: S3Server, mode: UploaderMode,
                                                           tmp_path: Any) -> None:
    """Each part, each single PUT and each manifest goes with an x-amz-checksum-crc32 of its
    own bytes, computed where they were read: what the server stored is what we sent, and
    it matches the bytes (moto keeps the checksums it is sent without checking them, so
    they are compared here with an independent computation)."""
    data = os.urandom(12 * MiB + 99)  # parts of 5, 5 and 2 MiB
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "small").write_bytes(data[:1000])
    async with backend(s3, mode=mode) as b:
        await b.put_file("ck/big", str(tmp_path / "big"), len(data))
        await b.put_file("ck/small", str(tmp_path / "small"), 1000)
        await b.put_bytes("ck/manifest.json", b'{"files": []}')
    c = s3.client()
    attrs = c.get_object_attributes(Bucket=BUCKET, Key=f"{PREFIX}/ck/big",
                                    ObjectAttributes=["Checksum"])
    parts = [data[o:o + 5 * MiB] for o in range(0, len(data), 5 * MiB)]
    composite = _b64crc32(b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts))
    assert attrs["Checksum"]["ChecksumCRC32"].split("-")[0] == composite
    for key, body in (("ck/small", data[:1000]), ("ck/manifest.json", b'{"files": []}')):
        head = c.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", ChecksumMode="ENABLED")
        assert head["ChecksumCRC32"] == _b64crc32(body)


@pytest.mark.s3
@pytest.mark.anyio
async def test_files_are_open_only_while_their_request_holds_a_slot(
        s3: S3Server, tmp_path: Any) -> None:
    """300 files uploaded and downloaded at once, with descriptors for 40 more than are open
    now: each file is opened only under one of the 4 limiter slots, never all up front."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    want = {f"f{i}": os.urandom(64) for i in range(300)}
    for name, data in want.items():
        (src / name).write_bytes(data)
    async with backend(s3) as b:
        await b.put_bytes("warm", b"")  # connection pools and worker threads exist already
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
        try:
            async with anyio.create_task_group() as tg:
                for name in want:
                    tg.start_soon(b.put_file, f"ck/{name}", str(src / name), 64)
            async with anyio.create_task_group() as tg:
                for name in want:
                    tg.start_soon(b.get_file, f"ck/{name}", str(out / name), 64)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == want


class RawServer:
    """A loopback HTTP server that records each request's raw head and body and answers
    from a script; ``close_after`` closes the connection after that many replies."""

    def __init__(self, replies: list[bytes], *, close_after: int = 0) -> None:
        import socket

        self.replies, self.close_after = list(replies), close_after
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.replies:
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn, conn.makefile("rb") as f:
                served = 0
                while self.replies:
                    head = b""
                    while (line := f.readline()) not in (b"\r\n", b""):
                        head += line
                    if not head:
                        break
                    length = next(int(x.split(b":")[1]) for x in head.split(b"\r\n")
                                  if x.lower().startswith(b"content-length:"))
                    self.requests.append((head, f.read(length)))
                    conn.sendall(self.replies.pop(0))
                    served += 1
                    if served == self.close_after:
                        break


def test_blocking_sender_sends_head_and_body_as_signed() -> None:
    from uploader.backends.s3.sender import BlockingSender

    ok = b"HTTP/1.1 200 OK\r\nETag: \"abc\"\r\nContent-Length: 2\r\n\r\nok"
    srv = RawServer([ok, ok, ok], close_after=2)
    sender = BlockingSender()
    body = memoryview(bytearray(os.urandom(3 * MiB)))
    headers = {"Authorization": b"AWS4-HMAC-SHA256 Credential=x", "x-amz-checksum-sha256": "c2E=",
               "Expect": b"100-continue", "Content-Length": b"3"}
    try:
        for _ in range(3):
            status, got, data = sender.send("PUT", f"{srv.url}/b/k?partNumber=1&uploadId=u",
                                            headers, body)
            assert (status, got["etag"], data) == (200, '"abc"', b"ok")
    finally:
        sender.close()
    head, sent = srv.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "PUT /b/k?partNumber=1&uploadId=u HTTP/1.1"
    assert "Authorization: AWS4-HMAC-SHA256 Credential=x" in lines  # bytes values decoded
    assert "x-amz-checksum-sha256: c2E=" in lines
    assert f"Content-Length: {3 * MiB}" in lines and "Content-Length: 3" not in lines
    assert not any(x.lower().startswith("expect") for x in lines)  # the body follows at once
    assert sent == body.tobytes() and len(srv.requests) == 3
    # Two requests on the first (kept-alive) connection; the server then closed it, so the
    # third went out again on a new one without surfacing an error.
    assert srv.connections == 2


@pytest.mark.s3
def test_listing_reads_manifests_concurrently(s3: S3Server, proxy: FaultProxy,
                                              tmp_path: Any) -> None:
    """40 committed checkpoints: the catalog asks for all 40 manifests before the first
    answer comes back (on S3 each is a round trip), and lists them newest first."""
    from uploader.catalog import Catalog

    src = tmp_path / "staging"
    src.mkdir()
    (src / "step.txt").write_bytes(b"0")
    engine = Engine(lambda ctx: S3Backend(ctx, bucket=BUCKET, prefix="metaflow",
                                          endpoint_url=proxy.endpoint),
                    Settings(upload_concurrency=4, max_pending=8, uploader=UploaderMode.THREAD),
                    snapshot_dir=str(tmp_path / "snapshots"), log=lambda _: None)
    scope = Scope("TrainFlow", "user:me", "train")
    try:
        saved = []
        for i in range(40):
            keys = CheckpointKeys(scope.prefix, "42", new_checkpoint_id("7", 0))
            saved.append(engine.save(SaveRequest(
                source=str(src), keys=keys, name="mfchckpt", latest=True,
                metadata={"i": i}, identity={}, reference={})))
        for h in saved:
            h.wait(timeout=60)
        hold = proxy.hold(method="GET", path_regex=r"/manifests/.*\.json$")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            listing = pool.submit(Catalog(engine).entries, scope.prefix)
            assert hold.wait_held(40, timeout=30), hold.held  # more than the 4 slots
            hold.release()
            entries = listing.result(timeout=30)
    finally:
        engine.close()
    assert [e.manifest.metadata["i"] for e in entries] == list(range(39, -1, -1))


@pytest.mark.s3
def test_the_drain_progress_moves_part_by_part_within_one_file(
        s3: S3Server, proxy: FaultProxy, mode: UploaderMode, tmp_path: Any) -> None:
    """One 20 MiB file in 5 MiB parts, one request at a time, its third part held: the
    drain's first progress report counts the two parts already stored."""
    from uploader.engine import DrainProgress

    src = tmp_path / "staging"
    src.mkdir()
    write_random(src / "weights.bin", 20 * MiB)
    engine = Engine(lambda ctx: S3Backend(ctx, bucket=BUCKET, prefix="metaflow",
                                          endpoint_url=proxy.endpoint),
                    Settings(part_size=5 * MiB, multipart_threshold=5 * MiB,
                             upload_concurrency=1, progress_interval=0.01, uploader=mode),
                    snapshot_dir=str(tmp_path / "snapshots"), log=lambda _: None)
    hold = proxy.hold(method="PUT", query_contains="partNumber=3")
    reports: list[DrainProgress] = []

    def progress(p: DrainProgress) -> None:
        reports.append(p)
        hold.release()  # the first report is made while the third part is held

    try:
        keys = CheckpointKeys(Scope("TrainFlow", "user:me", "train").prefix, "42",
                              new_checkpoint_id("7", 0))
        h = engine.save(SaveRequest(source=str(src), keys=keys, name="mfchckpt", latest=True,
                                    metadata={}, identity={}, reference={}))
        assert hold.wait_held(1, timeout=60)
        report = engine.drain(60, progress=progress)
    finally:
        hold.release()
        engine.close()
    assert report.committed == [h]
    assert reports and reports[0].pending == 1
    assert reports[0].bytes_left == 10 * MiB, reports[0]
    assert h.stats.bytes_uploaded == 20 * MiB and h.stats.bytes_left == 0


@pytest.mark.s3
@pytest.mark.anyio
async def test_small_reads_are_signed_here_and_errors_go_through_botocore(
        s3: S3Server, proxy: FaultProxy) -> None:
    async with backend(s3, endpoint=proxy.endpoint) as b:
        await b.put_bytes("ck/m.json", b'{"a": 1}')
        assert await b.get_bytes("ck/m.json") == b'{"a": 1}'
        assert await b.get_bytes("ck/missing.json") is None
        assert b._gets is not None and b._gets.sender.requests == 2  # no botocore GET
        assert proxy.count(method="GET") == 2
        proxy.add_rule(error(403, "AccessDenied"), method="GET")
        with pytest.raises(StorageAccessError, match=r"AccessDenied.*s3:GetObject"):
            await b.get_bytes("ck/m.json")
        assert proxy.count(method="GET") == 4  # ours, then botocore's, which explains it


@pytest.mark.s3
@pytest.mark.anyio
async def test_ranged_load_falls_back_per_range_and_hashes_in_order(
        s3: S3Server, proxy: FaultProxy, tmp_path: Any) -> None:
    """Two ranges answered 503 on the signed fast path: each is sent again through botocore
    (which would retry it) while the others are not, and the file's digest still covers
    every byte in order. A range refused for good fails the file, leaving nothing behind."""
    size = 23 * MiB
    src = tmp_path / "f"
    want = write_random(src, size)
    s3.client().upload_file(str(src), BUCKET, f"{PREFIX}/ck/f")
    async with backend(s3, endpoint=proxy.endpoint) as b:
        proxy.add_rule(error(503, "SlowDown"), method="GET", times=2)
        dest = tmp_path / "out" / "f"
        assert await b.get_file("ck/f", str(dest), size) == want
        assert hashlib.sha256(dest.read_bytes()).hexdigest() == want
        assert proxy.count(method="GET", action="error") == 2
        assert proxy.count(method="GET") == 5 + 2  # 5 ranges, 2 of them twice
        proxy.add_rule(error(403, "AccessDenied"), method="GET")
        with pytest.raises(StorageAccessError, match="AccessDenied"):
            await b.get_file("ck/f", str(tmp_path / "again" / "f"), size)
    assert os.listdir(tmp_path / "again") == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_a_part_is_one_buffer_never_copied(s3: S3Server, tmp_path: Any) -> None:
    """Copies per part, measured: with one part in flight, the most Python memory held at
    once is that part's buffer (read once with preadv, sent from the same memory with one
    system call), not two or five of them as when a body was joined, sliced and re-sent."""
    import tracemalloc

    part = 5 * MiB
    src = tmp_path / "f"
    want = write_random(src, 3 * part)
    ctx = TransferContext(
        settings=Settings(part_size=part, multipart_threshold=part, upload_concurrency=1,
                          uploader=UploaderMode.THREAD),
        limiter=anyio.CapacityLimiter(1), retry=RetryPolicy(max_attempts=1, deadline=30))
    b = S3Backend(ctx, bucket=BUCKET, prefix=PREFIX, endpoint_url=s3.endpoint)
    try:
        await b.put_file("warm", str(src), 3 * part)  # clients, pools, threads: not counted
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            assert await b.put_file("ck/f", str(src), 3 * part) == want
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    finally:
        await b.aclose()
    assert part <= peak < 1.25 * part, f"{peak / MiB:.1f} MiB held for a {part // MiB} MiB part"


def test_part_buffers_are_reused_while_busy_and_dropped_when_idle(tmp_path: Any) -> None:
    from uploader.backends.plane.parts import BufferPool, read_part

    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    pool = BufferPool()
    digest = hashlib.sha256()
    a = read_part(str(tmp_path / "f"), 0, 1000, digest, pool)
    b = read_part(str(tmp_path / "f"), 1000, 1000, digest, pool)
    buf_a = a._buf
    a.release()
    c = read_part(str(tmp_path / "f"), 2000, 1000, digest, pool)
    assert c._buf is buf_a  # reused while b was still in use
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert c.checksum == _b64crc32(data[2000:])
    assert (c.read(10), c.tell(), c.seek(0), c.read()) == (data[2000:2010], 10, 0, data[2000:])
    b.release()
    c.release()
    assert pool._free == []  # nothing in use: nothing kept
    d = read_part(str(tmp_path / "f"), 0, 1000, digest, pool)
    assert d._buf is not buf_a
    with pytest.raises(EOFError, match="truncated"):
        read_part(str(tmp_path / "f"), 2500, 1000, digest, pool)
    d.release()
    assert pool._in_use == 0 and pool._free == []
