"""The S3 backend against a real S3-compatible server (moto, in a child process).

Faults are injected by wrapping methods of the backend's one aiobotocore client, so the
requests that do go out are real ones and the server's state is checked with boto3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import threading
import weakref
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
from hypothesis import given
from hypothesis import strategies as st
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, running_s3_server

import uploader.backends.s3 as s3mod
from uploader.backends import S3Backend, TransferContext
from uploader.backends.s3 import MAX_PARTS, is_transient, part_size_for
from uploader.config import GiB, MiB, Settings
from uploader.engine import Engine, SaveRequest
from uploader.errors import CheckpointError, StorageAccessError, UploadError
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
    server.reset()
    server.client().create_bucket(Bucket=BUCKET)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return server


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


def make_ctx(policy: RetryPolicy | None = None) -> TransferContext:
    return TransferContext(
        settings=Settings(part_size=5 * MiB, multipart_threshold=5 * MiB, upload_concurrency=4),
        limiter=anyio.CapacityLimiter(4),
        retry=policy or RetryPolicy(max_attempts=3, deadline=30, initial_backoff=0.01),
    )


@contextlib.asynccontextmanager
async def backend(s3: S3Server, *, bucket: str = BUCKET, prefix: str = PREFIX,
                  policy: RetryPolicy | None = None) -> AsyncIterator[S3Backend]:
    b = S3Backend(make_ctx(policy), bucket=bucket, prefix=prefix, endpoint_url=s3.endpoint)
    try:
        yield b
    finally:
        await b.aclose()


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
async def test_small_round_trip(s3: S3Server, tmp_path: Any) -> None:
    src = tmp_path / "small.bin"
    want = write_random(src, 100_000)
    async with backend(s3) as b:
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
async def test_empty_file_round_trip(s3: S3Server, tmp_path: Any) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    async with backend(s3) as b:
        assert await b.put_file("ck/empty", str(src), 0) == hashlib.sha256().hexdigest()
        dest = tmp_path / "empty.out"
        assert await b.get_file("ck/empty", str(dest), 0) == hashlib.sha256().hexdigest()
    assert dest.read_bytes() == b""


@pytest.mark.s3
@pytest.mark.anyio
async def test_multipart_round_trip(s3: S3Server, tmp_path: Any) -> None:
    size = 23 * MiB + 12_345  # five parts of 5 MiB, the last one short
    src = tmp_path / "big.bin"
    want = write_random(src, size)
    async with backend(s3) as b:
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
async def test_parts_of_all_files_share_the_limiter(s3: S3Server, tmp_path: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two multipart files at once: never more than 4 parts in flight, nor 4 buffers."""
    sources = []
    for name in ("a", "b"):
        sources.append((tmp_path / name, write_random(tmp_path / name, 16 * MiB)))
    in_flight = peak = live = peak_live = 0
    lock = threading.Lock()  # bodies are made in worker threads and may die in any thread
    real_read = s3mod._read_hashing

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

    monkeypatch.setattr(s3mod, "_read_hashing", counting_read)
    async with backend(s3) as b:
        client = await b._get_client()
        real = client.upload_part

        async def upload_part(**kw: Any) -> Any:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await anyio.sleep(0.05)  # long enough for the other parts to pile up
                return await real(**kw)
            finally:
                in_flight -= 1

        client.upload_part = upload_part
        digests: dict[str, str] = {}

        async def put(path: Any) -> None:
            digests[path.name] = await b.put_file(path.name, str(path), 16 * MiB)

        async with anyio.create_task_group() as tg:
            for path, _ in sources:
                tg.start_soon(put, path)
    assert digests == {p.name: want for p, want in sources}
    assert peak == 4
    assert 2 <= peak_live <= 4  # part buffers exist only while their part holds a slot


@pytest.mark.s3
@pytest.mark.anyio
async def test_list_keys(s3: S3Server) -> None:
    s3.client().put_object(Bucket=BUCKET, Key="elsewhere/a/1", Body=b"x")
    s3.client().put_object(Bucket=BUCKET, Key=f"{PREFIX}x/a/1", Body=b"x")  # prefix, not root
    async with backend(s3) as b:
        for key in ("a/1", "a/2", "a/sub/3", "b/1"):
            await b.put_bytes(key, b"x")
        assert sorted(await b.list_keys("a/")) == ["a/1", "a/2", "a/sub/3"]
        assert sorted(await b.list_keys("")) == ["a/1", "a/2", "a/sub/3", "b/1"]
        assert await b.list_keys("nothing/") == []
    async with backend(s3, prefix="") as bare:
        assert "elsewhere/a/1" in await bare.list_keys("elsewhere/")


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
async def test_missing_key(s3: S3Server, tmp_path: Any) -> None:
    async with backend(s3) as b:
        assert await b.get_bytes("no/such/key") is None
        dest = tmp_path / "d" / "f"
        with pytest.raises(CheckpointError, match=f"{BUCKET}.*no/such/key"):
            await b.get_file("no/such/key", str(dest), 10)
    assert os.listdir(dest.parent) == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_get_file_hashes_the_bytes_it_wrote(s3: S3Server, tmp_path: Any) -> None:
    """A stored object longer than the manifest says must not verify as the shorter file."""
    data = os.urandom(1000)
    s3.client().put_object(Bucket=BUCKET, Key=f"{PREFIX}/ck/f", Body=data)
    async with backend(s3) as b:
        digest = await b.get_file("ck/f", str(tmp_path / "f"), 900)
    assert digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.s3
@pytest.mark.anyio
async def test_no_such_bucket_fails_at_once(s3: S3Server, tmp_path: Any) -> None:
    src = tmp_path / "f"
    write_random(src, 1000)
    policy = CountingPolicy(max_attempts=5, deadline=30, initial_backoff=0.01)
    async with backend(s3, bucket="ckpt-missing", policy=policy) as b:
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
async def test_transient_part_failure_resends_only_that_part(s3: S3Server,
                                                             tmp_path: Any) -> None:
    size = 16 * MiB
    src = tmp_path / "f"
    want = write_random(src, size)
    calls: list[int] = []
    async with backend(s3) as b:
        client = await b._get_client()
        real = client.upload_part

        async def upload_part(**kw: Any) -> Any:
            calls.append(kw["PartNumber"])
            if kw["PartNumber"] == 2 and calls.count(2) == 1:
                raise ConnectionClosedError(endpoint_url=s3.endpoint)
            return await real(**kw)

        client.upload_part = upload_part
        assert await b.put_file("ck/f", str(src), size) == want
        assert sorted(calls) == [1, 2, 2, 3, 4]
        dest = tmp_path / "out"
        assert await b.get_file("ck/f", str(dest), size) == want
    assert pending_uploads(s3) == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_failed_part_aborts_the_upload(s3: S3Server, tmp_path: Any) -> None:
    size = 23 * MiB
    src = tmp_path / "f"
    write_random(src, size)
    async with backend(s3) as b:
        client = await b._get_client()
        real = client.upload_part
        calls = 0

        async def upload_part(**kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise client_error("AccessDenied", 403, "UploadPart")
            return await real(**kw)

        client.upload_part = upload_part
        with pytest.raises(StorageAccessError, match=r"s3:PutObject") as info:
            await b.put_file("ck/f", str(src), size)
        assert BUCKET in str(info.value) and "ck/f" in str(info.value)
    assert pending_uploads(s3) == []
    assert "Contents" not in s3.client().list_objects_v2(Bucket=BUCKET)


@pytest.mark.s3
@pytest.mark.anyio
async def test_cancelled_upload_is_aborted(s3: S3Server, tmp_path: Any) -> None:
    size = 23 * MiB
    src = tmp_path / "f"
    write_random(src, size)
    async with backend(s3) as b:
        client = await b._get_client()
        real = client.upload_part
        stuck = anyio.Event()

        async def upload_part(**kw: Any) -> Any:
            if kw["PartNumber"] == 3:
                stuck.set()
                await anyio.sleep_forever()
            return await real(**kw)

        client.upload_part = upload_part
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.put_file, "ck/f", str(src), size)
            await stuck.wait()
            assert len(pending_uploads(s3)) == 1
            tg.cancel_scope.cancel()
    assert pending_uploads(s3) == []


@pytest.mark.s3
@pytest.mark.anyio
async def test_unreadable_file_aborts_and_propagates(s3: S3Server, tmp_path: Any) -> None:
    """A file shorter than recorded (truncated under the uploader) is not a storage error:
    it propagates as it is, so the engine can report a torn file."""
    src = tmp_path / "f"
    write_random(src, 12 * MiB)
    async with backend(s3) as b:
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


@pytest.mark.s3
def test_engine_saves_and_loads_through_s3(s3: S3Server, tmp_path: Any) -> None:
    """The backend as the engine drives it: save in the background, commit, list, load."""
    src = tmp_path / "staging"
    (src / "sub").mkdir(parents=True)
    want = {"state.pt": os.urandom(12 * MiB + 7), "sub/meta.json": b'{"epoch": 3}'}
    for rel, data in want.items():
        (src / rel).write_bytes(data)
    settings = Settings(part_size=5 * MiB, multipart_threshold=5 * MiB, upload_concurrency=4,
                        max_attempts=3, retry_deadline=30)
    engine = Engine(lambda ctx: S3Backend(ctx, bucket=BUCKET, prefix="metaflow",
                                          endpoint_url=s3.endpoint),
                    settings, snapshot_dir=str(tmp_path / "snapshots"), log=lambda _: None)
    try:
        scope = Scope("TrainFlow", "user:me", "train")
        keys = CheckpointKeys(scope.prefix, "42", new_checkpoint_id("7", 0))
        handle = engine.save(SaveRequest(source=str(src), keys=keys, name="mfchckpt",
                                         latest=True, metadata={"epoch": 3}, identity={},
                                         reference={}))
        handle.wait(timeout=60)
        (found,) = engine.list_manifest_keys(scope.manifests_prefix())
        manifest = engine.read_manifest(found)
        assert manifest is not None
        assert {f.path: f.sha256 for f in manifest.files} == {
            rel: hashlib.sha256(data).hexdigest() for rel, data in want.items()}
        engine.load(manifest, str(tmp_path / "restored"))
    finally:
        engine.close()
    for rel, data in want.items():
        assert (tmp_path / "restored" / rel).read_bytes() == data
    assert pending_uploads(s3) == []
