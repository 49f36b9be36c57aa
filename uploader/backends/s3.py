"""The S3 backend: aioboto3 with concurrent multipart uploads and ranged GETs.

One session and one client per backend (so per event loop), opened lazily inside the
loop and reused by every checkpoint. botocore is told not to retry (one attempt per
call): the only retry layer is ``TransferContext.retry``, applied to each request on its
own, so a failed part re-sends that part only and the two layers never multiply.

Memory is bounded by the shared limiter: a part's buffer exists only while its request
holds a limiter slot, and the slot is taken *before* the part is read. Parts are read in
order, each with one ``preadv`` into a fresh buffer in a worker thread; the same thread
call feeds the buffer to the file's SHA-256 (in order, so it is the whole-file digest),
and the buffer then goes to botocore as the request body. Every byte of the file is read
once and hashed once. Downloads write ranges with ``pwrite`` as they arrive; a hasher
follows the completed ranges in order, reading them back from the page cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aioboto3
import aiohttp
import anyio
import anyio.to_thread
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ..config import MIN_PART_SIZE, MiB
from ..errors import CheckpointError, StorageAccessError, UploadError, first_error
from .base import TransferContext

__all__ = ["S3Backend", "is_transient", "part_size_for"]

T = TypeVar("T")

MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * 1024**4  # S3's limit for one object: 5 TiB
_IO_CHUNK = 4 * MiB  # batch size for writing downloaded bytes, and for hashing reads

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException",
})
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_CREDENTIALS_ADVICE = ("check the AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                       "or AWS_PROFILE) and, for an S3-compatible server, "
                       "METAFLOW_S3_ENDPOINT_URL")


def part_size_for(size: int, configured: int) -> int:
    """The part size for a file of ``size`` bytes: at least ``configured`` and 5 MiB, and
    large enough (rounded up to a whole MiB) that no file needs more than 10,000 parts."""
    needed = -(-size // MAX_PARTS)  # ceil(size / MAX_PARTS)
    needed = -(-needed // MiB) * MiB
    return max(configured, MIN_PART_SIZE, needed)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry of the same request may cure: throttling, 5xx, dropped
    connections, timeouts. False for refusals (4xx) and for programming errors."""
    if isinstance(exc, ClientError):
        return _error_code(exc) in _TRANSIENT_CODES or _status(exc) in _TRANSIENT_STATUS
    if isinstance(exc, SSLError):
        # A certificate that fails verification stays failed; a TLS handshake cut short does not.
        return "CERTIFICATE_VERIFY_FAILED" not in str(exc)
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError)):
        return True
    if isinstance(exc, aiohttp.ClientError):
        return not isinstance(exc, (aiohttp.InvalidURL, ssl.SSLCertVerificationError,
                                    aiohttp.ClientResponseError))
    # ConnectionError covers reset, refused and broken pipe.
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError))


def _is_storage_error(exc: BaseException) -> bool:
    # Errors from talking to the store; anything else (a local file shrinking, a bug)
    # propagates as it is, so the engine can tell a torn file from a failed upload.
    return isinstance(exc, (BotoCoreError, ClientError, aiohttp.ClientError, TimeoutError,
                            asyncio.TimeoutError, ConnectionError))


def _read_hashing(fd: int, offset: int, length: int, digest: Any) -> io.BytesIO:
    """Read ``length`` bytes at ``offset`` straight into a request body and feed them to
    ``digest``. Runs in a worker thread.

    The body is a BytesIO sized first and filled in place through its own buffer: one
    copy (kernel to user) and no other full-size buffer. botocore passes a BytesIO on
    untouched and aiohttp streams it in 64 KiB slices; ``bytes`` would be copied again
    when aiohttp takes the BytesIO's buffer, and ``bytearray`` is sliced and joined to
    the headers (three full copies on Python 3.11, measured).
    """
    body = io.BytesIO()
    if length:
        body.seek(length - 1)
        body.write(b"\0")
    with body.getbuffer() as view:
        got = 0
        while got < length:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise EOFError(f"file ended at byte {offset + got}, expected {offset + length} "
                               "bytes: was it truncated while being uploaded?")
            got += n
        digest.update(view)  # releases the GIL for large buffers
    return body


def _rewound(body: io.BytesIO) -> io.BytesIO:
    body.seek(0)  # each attempt sends the body from its start
    return body


def _pwrite_all(fd: int, chunks: list[bytes], offset: int) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


def _hash_range(fd: int, offset: int, length: int, digest: Any) -> None:
    view = memoryview(bytearray(min(length, _IO_CHUNK)))  # one small buffer, reused
    end = offset + length
    while offset < end and (n := os.preadv(fd, [view[: end - offset]], offset)):
        digest.update(view[:n])
        offset += n


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class S3Backend:
    """Keys under ``s3://bucket/prefix``. See the module docstring for how it transfers."""

    kind = "s3"

    def __init__(
        self,
        ctx: TransferContext,
        *,
        bucket: str,
        prefix: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        client_kwargs: dict[str, Any] | None = None,
        session: aioboto3.Session | None = None,
    ) -> None:
        self._ctx = ctx
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._endpoint_url = endpoint_url
        self._region = region
        self._client_kwargs = dict(client_kwargs or {})
        self._session = session
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._client_lock = anyio.Lock()

    # -- plumbing ------------------------------------------------------------------

    def _okey(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._okey(key)}"

    async def _get_client(self) -> Any:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await self._open_client()
        return self._client

    async def _open_client(self) -> Any:
        if self._session is None:
            self._session = aioboto3.Session()  # credentials from boto's default chain
        kwargs = dict(self._client_kwargs)
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            # Over plain HTTP botocore would also CRC32 every body; we hash each file once.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=max(10, self._ctx.settings.upload_concurrency),
            connect_timeout=10,
            read_timeout=120,
            tcp_keepalive=True,
            # S3-compatible servers rarely resolve bucket.host names; AWS itself prefers them.
            s3={"addressing_style": "path"} if self._endpoint_url else None,
        )
        if "config" in kwargs:
            config = config.merge(kwargs.pop("config"))
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(self._session.client(
            "s3", endpoint_url=self._endpoint_url, region_name=self._region, config=config,
            **kwargs))
        self._stack = stack
        return client

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        # A fresh borrower per request: one task may hold several slots (one per part).
        token = object()
        await self._ctx.limiter.acquire_on_behalf_of(token)
        try:
            yield
        finally:
            self._ctx.limiter.release_on_behalf_of(token)

    async def _request(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One request, retried on its own, holding one limiter slot."""
        async with self._slot():
            return await self._ctx.retry.call(fn, is_transient=is_transient)

    @contextlib.contextmanager
    def _translated(self, key: str, doing: str, permission: str, *,
                    writing: bool = True) -> Iterator[None]:
        """Turn a storage error that survived the retries into one that says what to do."""
        try:
            yield
        except Exception as e:
            err = first_error(e) if isinstance(e, BaseExceptionGroup) else e
            if _is_storage_error(err):
                raise self._error(err, key, doing, permission, writing=writing) from err
            if err is not e:
                raise err from None
            raise

    def _error(self, exc: BaseException, key: str, doing: str, permission: str,
               *, writing: bool) -> CheckpointError:
        """A readable error for a request on ``key`` that failed for good."""
        where = f"{self.url_of(key)} (bucket {self.bucket!r}, key {self._okey(key)!r})"
        if isinstance(exc, NoCredentialsError):
            return StorageAccessError(
                f"{doing} {where}: no AWS credentials were found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role.", key=key)
        code = _error_code(exc) if isinstance(exc, ClientError) else ""
        advice = {
            "AccessDenied": f"check that the IAM policy and the bucket policy allow "
                            f"{permission} on this key",
            "AllAccessDisabled": "access to this bucket has been disabled by its owner",
            "NoSuchBucket": f"the bucket {self.bucket!r} does not exist; check that "
                            "METAFLOW_DATASTORE_SYSROOT_S3 names an existing bucket",
            "InvalidAccessKeyId": _CREDENTIALS_ADVICE,
            "SignatureDoesNotMatch": _CREDENTIALS_ADVICE,
            "InvalidToken": _CREDENTIALS_ADVICE,
            "ExpiredToken": "the AWS session token has expired; refresh the credentials",
            "RequestTimeTooSkewed": "this machine's clock is off by more than 15 minutes; "
                                    "synchronise it (NTP)",
        }.get(code)
        if advice:
            return StorageAccessError(f"{doing} {where} was refused ({code}): {advice}.", key=key)
        last = f"{type(exc).__name__}: {exc}"
        msg = (f"{doing} {where} failed after retrying: {last}" if is_transient(exc)
               else f"{doing} {where} failed: {last}")
        return UploadError(msg, key=key) if writing else CheckpointError(msg)

    # -- writing -------------------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes) -> None:
        with self._translated(key, "writing", "s3:PutObject"):
            client, okey = await self._get_client(), self._okey(key)
            await self._request(lambda: client.put_object(
                Bucket=self.bucket, Key=okey, Body=data, ContentLength=len(data)))

    async def put_file(self, key: str, path: str, size: int) -> str:
        if size > MAX_OBJECT_SIZE:
            raise UploadError(f"{path} is {size} bytes; S3 stores at most 5 TiB per object "
                              f"({self.url_of(key)}).", key=key)
        with self._translated(key, "uploading to", "s3:PutObject"):
            fd = await anyio.to_thread.run_sync(os.open, path, os.O_RDONLY)
            try:
                if size < self._ctx.settings.multipart_threshold:
                    return await self._put_single(key, fd, size)
                return await self._put_multipart(key, fd, size)
            finally:
                os.close(fd)

    async def _put_single(self, key: str, fd: int, size: int) -> str:
        client, okey = await self._get_client(), self._okey(key)
        digest = hashlib.sha256()
        async with self._slot():  # the slot covers the buffer as well as the request
            body = await anyio.to_thread.run_sync(_read_hashing, fd, 0, size, digest)
            await self._ctx.retry.call(lambda: client.put_object(
                Bucket=self.bucket, Key=okey, Body=_rewound(body), ContentLength=size),
                is_transient=is_transient)
        return digest.hexdigest()

    async def _put_multipart(self, key: str, fd: int, size: int) -> str:
        client, okey = await self._get_client(), self._okey(key)
        part_size = part_size_for(size, self._ctx.settings.part_size)
        created = await self._request(
            lambda: client.create_multipart_upload(Bucket=self.bucket, Key=okey))
        upload_id: str = created["UploadId"]
        try:
            digest = hashlib.sha256()
            etags: dict[int, str] = {}
            limiter = self._ctx.limiter

            async def send(number: int, length: int, body: io.BytesIO, token: object) -> None:
                try:
                    resp = await self._ctx.retry.call(lambda: client.upload_part(
                        Bucket=self.bucket, Key=okey, UploadId=upload_id, PartNumber=number,
                        Body=_rewound(body), ContentLength=length), is_transient=is_transient)
                    etags[number] = resp["ETag"]
                finally:
                    limiter.release_on_behalf_of(token)  # and the buffer goes with the task

            try:
                async with anyio.create_task_group() as tg:
                    for number, offset in enumerate(range(0, size, part_size), start=1):
                        length = min(part_size, size - offset)
                        token = object()
                        await limiter.acquire_on_behalf_of(token)  # before the read: bounds memory
                        try:
                            body = await anyio.to_thread.run_sync(
                                _read_hashing, fd, offset, length, digest)
                        except BaseException:
                            limiter.release_on_behalf_of(token)
                            raise
                        tg.start_soon(send, number, length, body, token)
                        del body  # the part's task owns it now, and frees it when done
            except BaseExceptionGroup as eg:
                raise first_error(eg) from None
            parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
            await self._complete(okey, upload_id, parts, size)
        except BaseException:
            with anyio.move_on_after(60, shield=True):
                await self._abort(okey, upload_id)
            raise
        return digest.hexdigest()

    async def _complete(self, okey: str, upload_id: str, parts: list[dict[str, Any]],
                        size: int) -> None:
        client = await self._get_client()
        sent = 0

        async def attempt() -> None:
            nonlocal sent
            # A retry may follow a Complete that succeeded but whose answer was lost. Its
            # upload id may be gone by then (S3: NoSuchUpload; moto: 500 for unknown
            # ids), so look for the object first.
            if sent and await self._is_complete(okey, size, len(parts)):
                return
            sent += 1
            await client.complete_multipart_upload(
                Bucket=self.bucket, Key=okey, UploadId=upload_id,
                MultipartUpload={"Parts": parts})

        try:
            await self._request(attempt)
        except Exception:
            # Out of retries, or NoSuchUpload: an earlier attempt may still have finished.
            if sent and await self._is_complete(okey, size, len(parts)):
                return
            raise

    async def _is_complete(self, okey: str, size: int, nparts: int) -> bool:
        """Whether ``okey`` holds a multipart object of our size and part count. Keys are
        unique per checkpoint, so that object can only be the one we were completing.
        Best effort (a role may lack s3:GetObject): any error means "not confirmed"."""
        client = await self._get_client()
        try:
            head = await self._ctx.retry.call(
                lambda: client.head_object(Bucket=self.bucket, Key=okey),
                is_transient=is_transient)
        except Exception as e:
            if _is_storage_error(e):
                return False
            raise
        etag = str(head.get("ETag", "")).strip('"')
        return bool(head.get("ContentLength") == size and etag.endswith(f"-{nparts}"))

    async def _abort(self, okey: str, upload_id: str) -> None:
        client = await self._get_client()
        # Best effort: the original error is what the user needs to see. An upload left
        # behind costs storage until a lifecycle rule (AbortIncompleteMultipartUpload) runs.
        with contextlib.suppress(Exception):
            await self._request(lambda: client.abort_multipart_upload(
                Bucket=self.bucket, Key=okey, UploadId=upload_id))

    # -- reading -------------------------------------------------------------------

    async def get_bytes(self, key: str) -> bytes | None:
        async def attempt() -> bytes | None:
            try:
                resp = await client.get_object(Bucket=self.bucket, Key=self._okey(key))
            except ClientError as e:
                if _error_code(e) in _NOT_FOUND:
                    return None
                raise
            body = resp["Body"]
            async with body:  # note: ``as`` would give aiohttp's response, not the body
                data: bytes = await body.read()
            return data

        with self._translated(key, "reading", "s3:GetObject", writing=False):
            client = await self._get_client()
            return await self._request(attempt)

    async def list_keys(self, prefix: str) -> list[str]:
        strip = len(self._okey(""))

        async def attempt() -> list[str]:  # the whole listing is retried as one request
            keys: list[str] = []
            client = await self._get_client()
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._okey(prefix))
            async for page in pages:
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", ()))
            return keys

        with self._translated(prefix, "listing", "s3:ListBucket", writing=False):
            return await self._request(attempt)

    async def get_file(self, key: str, dest: str, size: int) -> str:
        part_size = part_size_for(size, self._ctx.settings.part_size)
        if size < self._ctx.settings.multipart_threshold:
            ranges = [(0, size)]  # one GET without a Range header, streamed to disk
        else:
            ranges = [(o, min(part_size, size - o)) for o in range(0, size, part_size)]
        received = [0] * len(ranges)  # what each range actually wrote, which is what we hash
        written = [anyio.Event() for _ in ranges]
        digest = hashlib.sha256()

        async def fetch(i: int, fd: int) -> None:
            offset, length = ranges[i]
            whole = len(ranges) == 1
            extra = {} if whole else {"Range": f"bytes={offset}-{offset + length - 1}"}

            async def attempt() -> None:
                resp = await client.get_object(Bucket=self.bucket, Key=self._okey(key), **extra)
                if not whole and resp.get("ContentLength") != length:
                    raise CheckpointError(f"{self.url_of(key)}: asked for {length} bytes at "
                                          f"{offset}, got {resp.get('ContentLength')}")
                pos, body = offset, resp["Body"]
                async with body:  # releases the connection however the read ends
                    while True:
                        # Batch what aiohttp received and write it with one thread hop,
                        # without joining the chunks first.
                        batch, n = [], 0
                        while n < _IO_CHUNK and (chunk := await body.read(_IO_CHUNK - n)):
                            batch.append(chunk)
                            n += len(chunk)
                        if not batch:
                            break
                        await anyio.to_thread.run_sync(_pwrite_all, fd, batch, pos)
                        pos += n
                received[i] = pos - offset  # aiobotocore checked it against Content-Length

            await self._request(attempt)
            written[i].set()

        async def hash_in_order(fd: int) -> None:
            # Trails the downloads: range i is hashed (from the page cache) once it and
            # every range before it are on disk, so hashing overlaps the transfer.
            for i, (offset, _) in enumerate(ranges):
                await written[i].wait()
                await anyio.to_thread.run_sync(_hash_range, fd, offset, received[i], digest)

        def open_tmp() -> tuple[str, int]:
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
            return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

        with self._translated(key, "downloading", "s3:GetObject", writing=False):
            client = await self._get_client()
            tmp, fd = await anyio.to_thread.run_sync(open_tmp)
            try:
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(hash_in_order, fd)
                        for i in range(len(ranges)):
                            tg.start_soon(fetch, i, fd)
                finally:
                    os.close(fd)
                await anyio.to_thread.run_sync(os.replace, tmp, dest)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_unlink_quietly, tmp)
                raise
        return digest.hexdigest()
