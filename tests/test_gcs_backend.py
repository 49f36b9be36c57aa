"""The GCS backend against a real GCS emulator (fake-gcs-server, in a child process).

The first part is the backend contract every store passes, written against the store
kit's interface only (``store.backend(ctx)``, ``store.client()``): at the merge with the
contract suite these tests become its "gcs" parameter by registering :class:`GCSKit`.
The second part is what only GCS has: the CRC32C it keeps, resumable sessions, chunking.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import anyio
import google_crc32c
import pytest
from hypothesis import given
from hypothesis import strategies as st

from uploader.backends.base import Backend, TransferContext
from uploader.config import MiB, Settings
from uploader.errors import StorageAccessError
from uploader.retry import RetryPolicy

T = TypeVar("T")
pytestmark = pytest.mark.gcs


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(gcs_store: Any) -> Any:
    """The store under test; the contract suite parametrises this over every store."""
    return gcs_store


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
async def backend(store: Any, policy: RetryPolicy | None = None, **kw: Any
                  ) -> AsyncIterator[Any]:
    b: Backend = store.backend(make_ctx(policy), **kw)
    try:
        yield b
    finally:
        await b.aclose()


def write_random(path: Any, size: int) -> str:
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def b64crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode()


# -- beyond the contract suite (tests/test_backend_contract.py runs that on GCS too) --


@pytest.mark.anyio
async def test_list_keys_follows_every_page(store: Any) -> None:
    async with backend(store, page_size=2) as b:  # 7 keys: 4 pages
        for i in range(7):
            await b.put_bytes(f"m/{i}", b"")
        assert sorted(await b.list_keys("m/")) == [f"m/{i}" for i in range(7)]
        assert len(await b.list_objects("m/")) == 7


# -- what only GCS has -----------------------------------------------------------------


@pytest.mark.anyio
async def test_every_object_is_stored_with_the_checksum_sent(store: Any, tmp_path: Any) -> None:
    """Each upload names the CRC32C of its bytes (computed as they were read), and the
    object GCS keeps has that CRC32C and the MD5 of the bytes: checked here against
    independent computations, through Google's own client."""
    data = os.urandom(12 * MiB + 99)
    (tmp_path / "big").write_bytes(data)
    (tmp_path / "small").write_bytes(data[:1000])
    async with backend(store) as b:
        await b.put_file("ck/big", str(tmp_path / "big"), len(data))
        await b.put_file("ck/small", str(tmp_path / "small"), 1000)
        await b.put_bytes("ck/manifest.json", b'{"files": []}')
    bucket = store.client()
    for key, body in (("ck/big", data), ("ck/small", data[:1000]),
                      ("ck/manifest.json", b'{"files": []}')):
        blob = bucket.get_blob(store.object_name(key))
        assert blob.size == len(body)
        assert blob.crc32c == b64crc32c(body)
        assert blob.md5_hash == base64.b64encode(hashlib.md5(body).digest()).decode()


@pytest.mark.anyio
async def test_resumable_chunks_are_whole_multiples_of_256_kib(store: Any, tmp_path: Any,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """A big file goes in chunks of part_size rounded down to 256 KiB; only the last is
    shorter, and only the last names the file's CRC32C (for GCS to check on finalizing)."""
    from uploader.backends import gcs

    sent: list[tuple[int, int, str | None]] = []
    real = gcs.GCSBackend._send_chunk

    async def recording(self: Any, uri: str, data: bytes, offset: int, size: int,
                        crc: str | None) -> Any:
        sent.append((offset, len(data), crc))
        return await real(self, uri, data, offset, size, crc)

    monkeypatch.setattr(gcs.GCSBackend, "_send_chunk", recording)
    size = 11 * MiB + 3
    src = tmp_path / "f"
    data = os.urandom(size)
    src.write_bytes(data)
    ctx = TransferContext(
        settings=Settings(part_size=5 * MiB + 1000, multipart_threshold=5 * MiB,
                          upload_concurrency=2),
        limiter=anyio.CapacityLimiter(2), retry=RetryPolicy(max_attempts=2, deadline=30))
    b = store.backend(ctx)
    try:
        await b.put_file("ck/f", str(src), size)
    finally:
        await b.aclose()
    step = 5 * MiB  # 5 MiB + 1000 rounded down
    assert sent == [(0, step, None), (step, step, None), (2 * step, size - 2 * step,
                                                          b64crc32c(data))]


@given(configured=st.integers(1, 5 * 1024 * MiB))
def test_chunk_size_is_a_multiple_of_256_kib(configured: int) -> None:
    from uploader.backends.gcs.backend import QUANTUM, chunk_size_for

    step = chunk_size_for(configured)
    assert step % QUANTUM == 0 and step >= QUANTUM
    assert step <= max(configured, QUANTUM) < step + QUANTUM


@pytest.mark.anyio
async def test_a_resumable_upload_holds_one_chunk_at_a_time(store: Any, tmp_path: Any) -> None:
    """Memory for a big file is bounded by its chunk, not its size: with one slot, the
    most Python memory held at once for a file of eight chunks is about two (the chunk
    being read, and the one sent before it until the connection lets go of it)."""
    import tracemalloc

    part = 5 * MiB
    src = tmp_path / "f"
    want = write_random(src, 8 * part)
    ctx = TransferContext(
        settings=Settings(part_size=part, multipart_threshold=part, upload_concurrency=1),
        limiter=anyio.CapacityLimiter(1), retry=RetryPolicy(max_attempts=1, deadline=30))
    b = store.backend(ctx)
    try:
        await b.put_file("warm", str(src), 8 * part)  # sessions, pools: not counted
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            assert await b.put_file("ck/f", str(src), 8 * part) == want
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    finally:
        await b.aclose()
    assert part <= peak < 2.5 * part, f"{peak / MiB:.1f} MiB held for {part // MiB} MiB chunks"


@pytest.mark.anyio
async def test_a_missing_bucket_fails_at_once_and_says_what_to_check(store: Any, tmp_path: Any
                                                                     ) -> None:
    src = tmp_path / "f"
    write_random(src, 10)
    policy = CountingPolicy(max_attempts=5, deadline=30, initial_backoff=0.01)
    b = store.backend(make_ctx(policy))
    b.bucket = "no-such-bucket-here"
    try:
        with pytest.raises(StorageAccessError, match="METAFLOW_DATASTORE_SYSROOT_GS"):
            await b.put_file("ck/f", str(src), 10)
    finally:
        await b.aclose()
    assert len(policy.attempts) == 1  # a 404 is not retried


@pytest.mark.anyio
async def test_abort_upload_cancels_a_resumable_session(store: Any) -> None:
    """Sessions cannot be listed (list_uploads is always empty), but one whose URI is
    known can be cancelled, and cancelling one already gone is not an error."""
    async with backend(store) as b:
        await b.put_bytes("warm", b"")
        uri = await b._start_session(store.object_name("ck/x"), 10 * MiB)
        await b.abort_upload("ck/x", uri)
        await b.abort_upload("ck/x", uri)
        assert await b.list_uploads("") == []
        assert await b.list_keys("ck/") == []


def _response_error(status: int) -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(aiohttp.client_reqrep.URL("http://x"), "GET", {},  # type: ignore[arg-type]
                               aiohttp.client_reqrep.URL("http://x"))
    return aiohttp.ClientResponseError(info, (), status=status, message="injected")


@pytest.mark.parametrize("exc, transient", [
    (_response_error(429), True),
    (_response_error(408), True),
    (_response_error(500), True),
    (_response_error(502), True),
    (_response_error(503), True),
    (_response_error(504), True),
    (_response_error(400), False),
    (_response_error(401), False),
    (_response_error(403), False),
    (_response_error(404), False),
    (_response_error(412), False),
    (aiohttp.ServerDisconnectedError(), True),
    (aiohttp.ClientPayloadError("truncated"), True),
    (aiohttp.ClientOSError(104, "reset"), True),
    (aiohttp.InvalidURL("nope"), False),
    (TimeoutError(), True),
    (ConnectionResetError(), True),
    (ValueError("bug"), False),
    (FileNotFoundError("gone"), False),
])
def test_is_transient(exc: BaseException, transient: bool) -> None:
    from uploader.backends.gcs.errors import is_transient

    assert is_transient(exc) is transient


def test_urls_and_keys() -> None:
    from uploader.backends.gcs import GCSBackend

    b = GCSBackend(make_ctx(), bucket="b", prefix="/root/p/")
    assert (b.kind, b.url, b.url_of("x/y")) == ("gs", "gs://b/root/p", "gs://b/root/p/x/y")
    assert b.endpoint == "https://storage.googleapis.com"
    bare = GCSBackend(make_ctx(), bucket="b", prefix="")
    assert (bare.url, bare.url_of("x/y")) == ("gs://b", "gs://b/x/y")
