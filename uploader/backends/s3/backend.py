"""The S3 backend: aioboto3 with concurrent multipart uploads and ranged GETs.

One session and one client per backend (so per event loop), opened lazily inside the
loop and reused by every checkpoint. botocore is told not to retry (one attempt per
call): the only retry layer is ``TransferContext.retry``, applied to each request on its
own, so a failed part re-sends that part only and the two layers never multiply.

Memory and file descriptors are bounded by the shared limiter: a part's buffer exists,
and its file is open, only while its request holds a limiter slot, and the slot is taken
*before* the part is read. Each request goes to a data plane (:mod:`.dataplane`, in
worker threads or a worker process, :mod:`..plane.planes`, as ``Settings.uploader`` says),
which reads the part once, feeds the file's running SHA-256 in part order, computes the
part's CRC32 and sends it as ``ChecksumCRC32`` (S3 verifies it, so the body itself is not
signed: ``UNSIGNED-PAYLOAD``), and writes the body with one system call
(:mod:`.sender`). This event loop coordinates: what to send, retries, aborts, commits.

Small reads (manifests) and ranged downloads are signed here and received by worker
threads (:class:`.sender.SignedGets`), a range straight into the file's pages, hashed
in range order; anything but a success goes through botocore, which retries and explains.

The sender connects as the client would (its CA bundle, client certificate, timeouts), read
from the client once it exists (:mod:`.transport`); where it cannot (a proxy), every
request goes through botocore's own HTTP stack.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import aioboto3
import anyio
import anyio.to_thread
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    NoCredentialsError,
)

from ...config import MIN_PART_SIZE, MiB, UploaderMode
from ...errors import CheckpointError, StorageAccessError, UploadError, first_error
from ..base import StoredObject, TransferContext, Upload, stored
from ..plane.jobs import Outcome
from ..plane.parts import InOrderDigest, checksum_of
from ..plane.planes import Plane, ProcessPlane, ThreadPlane
from .checksums import check_stored, composite_checksum
from .dataplane import ClientSpec, Creds, PartJob
from .errors import (
    NOT_FOUND,
    TRANSIENT_CODES,
    error_code,
    explain,
    is_storage_error,
    is_transient,
)
from .sender import BlockingSender, SignedGets
from .transport import tls_context, transport_of

__all__ = ["S3Backend", "is_transient", "part_size_for"]

T = TypeVar("T")

MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * 1024**4  # S3's limit for one object: 5 TiB
_IO_CHUNK = 4 * MiB  # batch size for writing downloaded bytes, and for hashing reads
# Manifests and hints (a few KiB each) are read this many at a time, beside the transfer
# limiter: a listing of 1,000 checkpoints is then 16 round trips, not 63 (or 1,000).
_SMALL_READS = 64
_DELETE_BATCH = 1000  # S3's limit of keys per DeleteObjects request
_SENT_REMEMBERED = 16384  # objects whose stored checksum is remembered (see confirm())

def part_size_for(size: int, configured: int) -> int:
    """The part size for a file of ``size`` bytes: at least ``configured`` and 5 MiB, and
    large enough (rounded up to a whole MiB) that no file needs more than 10,000 parts."""
    needed = -(-size // MAX_PARTS)  # ceil(size / MAX_PARTS)
    needed = -(-needed // MiB) * MiB
    return max(configured, MIN_PART_SIZE, needed)


def _pwrite_all(fd: int, chunks: list[bytes], offset: int) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _check_tls(spec: ClientSpec, endpoint: str) -> None:
    """Fail at once, and say why, where the CA bundle or client certificate the client
    resolved cannot be loaded (botocore would fail every request, less readably)."""
    try:
        tls_context(spec.verify, spec.client_cert)
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise StorageAccessError(
            f"the TLS settings for {endpoint} cannot be used: {type(e).__name__}: {e}. The CA "
            f"bundle is {spec.verify!r} (from verify=, METAFLOW_S3_VERIFY_CERTIFICATE, "
            "AWS_CA_BUNDLE, ca_bundle in the AWS config or REQUESTS_CA_BUNDLE; True is "
            f"botocore's own bundle) and the client certificate {spec.client_cert!r} (from "
            "client_cert in the client's config); point them at readable PEM files.") from e


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
        self._plane: Plane | None = None
        self._small_reads: anyio.CapacityLimiter | None = None
        self._gets: SignedGets | None = None
        self._ids = itertools.count(1)  # request and file ids for the data plane
        # Object key -> the ChecksumCRC32 S3 keeps for what this backend stored there.
        self._sent: collections.OrderedDict[str, str] = collections.OrderedDict()

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
            max_pool_connections=self._ctx.settings.upload_concurrency + _SMALL_READS,
            connect_timeout=10,
            read_timeout=120,
            tcp_keepalive=True,
            s3={
                # Bodies carry a ChecksumCRC32 that S3 verifies, computed where they are
                # read; signing them too would hash every byte again, on the event loop.
                "payload_signing_enabled": False,
                # S3-compatible servers rarely resolve bucket.host names; AWS prefers them.
                **({"addressing_style": "path"} if self._endpoint_url else {}),
            },
        )
        if "config" in kwargs:  # the caller's timeouts, proxies, client certificate...
            # ...but never botocore's retries under ours.
            config = config.merge(kwargs.pop("config")).merge(Config(retries=config.retries))
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(self._session.client(
            "s3", endpoint_url=self._endpoint_url, region_name=self._region, config=config,
            **kwargs))
        self._stack = stack
        resolved, transport = client.meta.config, transport_of(client)
        spec = ClientSpec(
            endpoint_url=self._endpoint_url, region=client.meta.region_name,
            verify=transport.verify, client_cert=transport.client_cert,
            s3_options=dict(resolved.s3 or {}),
            connect_timeout=float(resolved.connect_timeout or 10),
            read_timeout=float(resolved.read_timeout or 120),
            proxies=resolved.proxies, proxies_config=resolved.proxies_config,
            direct=transport.direct)
        if spec.direct and str(client.meta.endpoint_url).lower().startswith("https:"):
            _check_tls(spec, str(client.meta.endpoint_url))
        self._small_reads = anyio.CapacityLimiter(_SMALL_READS)
        self._small_threads = anyio.CapacityLimiter(_SMALL_READS)  # one per read, never short
        self._range_threads = anyio.CapacityLimiter(self._ctx.settings.upload_concurrency)
        if spec.direct and client.meta.region_name:
            try:  # where the client would send a GET: endpoint rules, addressing style
                sample = await client.generate_presigned_url(
                    "get_object", Params={"Bucket": self.bucket, "Key": "k"}, ExpiresIn=60)
            except Exception:
                sample = ""
            base = sample.split("?", 1)[0]
            if base.endswith("/k"):  # the key is appended as is: no surprises in the URL
                self._gets = SignedGets(
                    BlockingSender(verify=spec.verify, client_cert=spec.client_cert,
                                   connect_timeout=spec.connect_timeout,
                                   read_timeout=spec.read_timeout),
                    base_url=base[:-1], region=str(client.meta.region_name))
        settings = self._ctx.settings
        threads = settings.upload_concurrency
        self._plane = (ProcessPlane(spec, threads, timeout=settings.worker_timeout,
                                    min_rate=settings.worker_min_rate, log=self._ctx.log)
                       if settings.uploader is UploaderMode.PROCESS
                       else ThreadPlane(spec, threads))
        return client

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        plane, self._plane = self._plane, None
        gets, self._gets = self._gets, None
        if gets is not None:
            gets.sender.close()
        try:
            if stack is not None:
                await stack.aclose()
        finally:
            if plane is not None:
                await plane.aclose()

    async def _creds(self) -> Creds:
        client = await self._get_client()
        creds = client._request_signer._credentials  # what this client signs with
        if creds is None:
            raise NoCredentialsError()
        frozen = await creds.get_frozen_credentials()
        return Creds(frozen.access_key, frozen.secret_key, frozen.token)

    async def _run(self, job: PartJob) -> Outcome:
        """Send ``job`` through the data plane, retried as one request. A retry must read
        the same bytes as the first attempt (the file digest already has them)."""
        assert self._plane is not None
        plane, expect = self._plane, None

        async def attempt() -> Outcome:
            nonlocal expect
            out = await plane.run(dataclasses.replace(
                job, job_id=next(self._ids), creds=await self._creds(), expect=expect))
            expect = expect or out.checksum
            if out.error is not None:
                raise out.error
            return out

        return await self._ctx.retry.call(attempt, is_transient=is_transient)

    async def _request(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One request, retried on its own, holding one limiter slot."""
        async with self._ctx.slot():
            return await self._ctx.retry.call(fn, is_transient=is_transient)

    @contextlib.contextmanager
    def _translated(self, key: str, doing: str, permission: str, *,
                    writing: bool = True) -> Iterator[None]:
        """Turn a storage error that survived the retries into one that says what to do."""
        try:
            yield
        except Exception as e:
            err = first_error(e) if isinstance(e, BaseExceptionGroup) else e
            if is_storage_error(err):
                raise self._error(err, key, doing, permission, writing=writing) from err
            if err is not e:
                raise err from None
            raise

    def _error(self, exc: BaseException, key: str, doing: str, permission: str,
               *, writing: bool) -> CheckpointError:
        """A readable error for a request on ``key`` that failed for good."""
        where = f"{self.url_of(key)} (bucket {self.bucket!r}, key {self._okey(key)!r})"
        return explain(exc, bucket=self.bucket, key=key, where=where, doing=doing,
                       permission=permission, writing=writing)

    # -- writing -------------------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes) -> None:
        with self._translated(key, "writing", "s3:PutObject"):
            client, okey = await self._get_client(), self._okey(key)
            checksum = checksum_of(data)
            await self._request(lambda: client.put_object(
                Bucket=self.bucket, Key=okey, Body=data, ContentLength=len(data),
                ChecksumAlgorithm="CRC32", ChecksumCRC32=checksum))
            self._remember_sent(okey, checksum)

    async def put_file(self, key: str, path: str, size: int) -> str:
        if size > MAX_OBJECT_SIZE:
            raise UploadError(f"{path} is {size} bytes; S3 stores at most 5 TiB per object "
                              f"({self.url_of(key)}).", key=key)
        with self._translated(key, "uploading to", "s3:PutObject"):
            if size < self._ctx.settings.multipart_threshold:
                return await self._put_single(key, path, size)
            return await self._put_multipart(key, path, size)

    async def digest_file(self, path: str, size: int) -> str:
        """The SHA-256 of a local file an incremental save may find unchanged, read by the
        data plane (the worker process, by default) rather than under the task's GIL."""
        await self._get_client()  # the plane comes with the client
        assert self._plane is not None
        return await self._plane.hash_file(path, size)

    def _job(self, okey: str, path: str, offset: int, length: int, **kw: Any) -> PartJob:
        return PartJob(job_id=0, creds=Creds("", "", None), bucket=self.bucket, key=okey,
                       path=path, offset=offset, length=length, **kw)

    def _remember_sent(self, okey: str, checksum: str | None) -> None:
        if checksum is None:
            return
        self._sent[okey] = checksum
        self._sent.move_to_end(okey)
        while len(self._sent) > _SENT_REMEMBERED:
            self._sent.popitem(last=False)

    async def _put_single(self, key: str, path: str, size: int) -> str:
        await self._get_client()
        async with self._ctx.slot():  # the slot covers the open file and the buffer too
            out = await self._run(self._job(self._okey(key), path, 0, size))
        assert out.digest is not None
        self._remember_sent(self._okey(key), out.checksum)
        return out.digest

    async def _put_multipart(self, key: str, path: str, size: int) -> str:
        client, okey = await self._get_client(), self._okey(key)
        assert self._plane is not None
        plane = self._plane
        part_size = part_size_for(size, self._ctx.settings.part_size)
        created = await self._request(lambda: client.create_multipart_upload(
            Bucket=self.bucket, Key=okey, ChecksumAlgorithm="CRC32"))
        upload_id: str = created["UploadId"]
        file_id = next(self._ids)
        try:
            done: dict[int, dict[str, Any]] = {}
            spans: dict[int, tuple[int, int]] = {}  # part number -> (offset, length)
            limiter = self._ctx.limiter

            async def send(number: int, offset: int, length: int, token: object) -> None:
                try:
                    out = await self._run(self._job(
                        okey, path, offset, length, upload_id=upload_id, part_number=number,
                        file_id=file_id))
                    done[number] = {"PartNumber": number, "ETag": out.etag,
                                    "ChecksumCRC32": out.checksum}
                    stored(length)
                finally:
                    limiter.release_on_behalf_of(token)

            try:
                async with anyio.create_task_group() as tg:
                    for number, offset in enumerate(range(0, size, part_size), start=1):
                        spans[number] = (offset, min(part_size, size - offset))
                        token = object()
                        # Taken in part order, before the part is read: bounds memory and
                        # open files, and the data plane hashes parts in this order.
                        await limiter.acquire_on_behalf_of(token)
                        tg.start_soon(send, number, *spans[number], token)
            except BaseExceptionGroup as eg:
                raise first_error(eg) from None
            parts = [done[n] for n in sorted(done)]
            digest = await plane.file_digest(file_id, path=path, parts=[
                (*spans[p["PartNumber"]], p["ChecksumCRC32"]) for p in parts])
            await self._complete(okey, upload_id, parts, size)
            self._remember_sent(okey, composite_checksum([p["ChecksumCRC32"] for p in parts]))
        except BaseException:
            with anyio.move_on_after(60, shield=True):
                await plane.drop_file(file_id)
                await self._abort(okey, upload_id)
            raise
        return digest

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
            if is_storage_error(e):
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
                if error_code(e) in NOT_FOUND:
                    return None
                raise
            body = resp["Body"]
            async with body:  # note: ``as`` would give aiohttp's response, not the body
                data: bytes = await body.read()
            return data

        with self._translated(key, "reading", "s3:GetObject", writing=False):
            client = await self._get_client()
            assert self._small_reads is not None
            async with self._small_reads:
                if self._gets is not None:
                    found = await self._signed_get(self._okey(key))
                    if found is not None:
                        return found[0]
                return await self._ctx.retry.call(attempt, is_transient=is_transient)

    async def _signed_get_into(self, okey: str, fd: int, offset: int, length: int | None,
                               feed: Callable[[memoryview], None]) -> int | None:
        """Bytes written by one GET through :class:`SignedGets`, in one worker-thread call;
        None where the full client must do it instead."""
        if self._gets is None:
            return None
        creds = await self._creds()
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(self._gets.get_into, okey, creds.access_key,
                                  creds.secret_key, creds.token, fd=fd, offset=offset,
                                  length=length, feed=feed), limiter=self._range_threads)
        except Exception:
            return None

    async def _signed_get(self, okey: str) -> tuple[bytes | None] | None:
        """(body,) or (None,) for a missing key, through :class:`SignedGets`; None where the
        full client must answer (an error of any kind: it retries and explains)."""
        assert self._gets is not None
        creds = await self._creds()
        try:
            status, body = await anyio.to_thread.run_sync(
                self._gets.get, okey, creds.access_key, creds.secret_key, creds.token,
                limiter=self._small_threads)
        except Exception:
            return None
        if status == 200:
            return (body,)
        return (None,) if status == 404 else None

    async def stat(self, key: str) -> int | None:
        async def attempt() -> int | None:
            try:
                head = await client.head_object(Bucket=self.bucket, Key=self._okey(key))
            except ClientError as e:
                if error_code(e) in NOT_FOUND:
                    return None
                raise
            return int(head["ContentLength"])

        with self._translated(key, "looking at", "s3:GetObject", writing=False):
            client = await self._get_client()
            return await self._request(attempt)

    async def confirm(self, key: str, size: int, sha256: str, local: str | bytes
                      ) -> str | None:
        okey = self._okey(key)

        async def head(**kw: Any) -> dict[str, Any] | None:
            async def attempt() -> dict[str, Any] | None:
                try:
                    found: dict[str, Any] = await client.head_object(
                        Bucket=self.bucket, Key=okey, **kw)
                except ClientError as e:
                    if error_code(e) in NOT_FOUND:
                        return None
                    raise
                return found
            return await self._request(attempt)

        with self._translated(key, "looking at", "s3:GetObject", writing=False):
            client = await self._get_client()
            why, stored = await check_stored(head, size, sha256, local,
                                             sent=self._sent.get(okey),
                                             limiter=self._ctx.limiter)
        if why is None:
            self._remember_sent(okey, stored)
        return why

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

    async def list_objects(self, prefix: str) -> list[StoredObject]:
        strip = len(self._okey(""))

        async def attempt() -> list[StoredObject]:
            out: list[StoredObject] = []
            client = await self._get_client()
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._okey(prefix))
            async for page in pages:
                out.extend(StoredObject(o["Key"][strip:], int(o.get("Size", 0)),
                                        o["LastModified"].timestamp())
                           for o in page.get("Contents", ()))
            return out

        with self._translated(prefix, "listing", "s3:ListBucket", writing=False):
            return await self._request(attempt)

    async def delete_keys(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        """DeleteObjects in batches of 1,000. A key S3 reports with a transient error code
        is sent again in a later round, as a retry of its own; others are returned."""
        strip = len(self._okey(""))
        failed: list[tuple[str, str]] = []
        client = await self._get_client()
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = list(keys[start:start + _DELETE_BATCH])
            for round_ in range(self._ctx.retry.max_attempts):
                objects = [{"Key": self._okey(k)} for k in batch]
                with self._translated(batch[0], f"deleting {len(batch)} key(s), the first",
                                      "s3:DeleteObject", writing=False):
                    resp = await self._request(functools.partial(
                        client.delete_objects, Bucket=self.bucket,
                        Delete={"Objects": objects, "Quiet": True}))
                retry: list[str] = []
                for err in resp.get("Errors", ()):
                    key, code = str(err.get("Key", ""))[strip:], str(err.get("Code", ""))
                    if code in TRANSIENT_CODES and round_ + 1 < self._ctx.retry.max_attempts:
                        retry.append(key)
                    else:
                        failed.append((key, f"deleting {self.url_of(key)} failed: {code}: "
                                            f"{err.get('Message', '')}"))
                if not retry:
                    break
                batch = retry
                await anyio.sleep(min(self._ctx.retry.max_backoff,
                                      self._ctx.retry.initial_backoff * 2 ** round_))
        return failed

    async def list_uploads(self, prefix: str) -> list[Upload]:
        strip = len(self._okey(""))

        async def attempt() -> list[Upload]:
            out: list[Upload] = []
            client = await self._get_client()
            pages = client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._okey(prefix))
            async for page in pages:
                out.extend(Upload(u["Key"][strip:], u["UploadId"], u["Initiated"].timestamp())
                           for u in page.get("Uploads", ())
                           if u["Key"].startswith(self._okey(prefix)))
            return out

        with self._translated(prefix, "listing multipart uploads under",
                              "s3:ListBucketMultipartUploads", writing=False):
            return await self._request(attempt)

    async def abort_upload(self, key: str, upload_id: str) -> None:
        async def attempt() -> None:
            try:
                await client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._okey(key), UploadId=upload_id)
            except ClientError as e:
                if error_code(e) != "NoSuchUpload":  # already gone: what we wanted
                    raise

        with self._translated(key, f"aborting the multipart upload {upload_id} of",
                              "s3:AbortMultipartUpload", writing=False):
            client = await self._get_client()
            await self._request(attempt)

    async def get_file(self, key: str, dest: str, size: int) -> str:
        part_size = part_size_for(size, self._ctx.settings.part_size)
        if size < self._ctx.settings.multipart_threshold:
            ranges = [(0, size)]  # one GET without a Range header, streamed to disk
        else:
            ranges = [(o, min(part_size, size - o)) for o in range(0, size, part_size)]
        received = [-1] * len(ranges)  # what each range actually wrote, which is what we hash
        hasher = InOrderDigest()
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"

        async def fetch(i: int) -> None:
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

            async with self._ctx.slot():  # the file is open only while the request holds a slot
                fd = await anyio.to_thread.run_sync(os.open, tmp, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    # Hashed in range order, by the thread that has the bytes (ours) or
                    # from the page cache (botocore's): the whole file's digest.
                    got = await self._signed_get_into(self._okey(key), fd, offset,
                                                      None if whole else length,
                                                      functools.partial(hasher.feed, i))
                    if got is not None:
                        received[i] = got
                    else:  # botocore's way: it retries, follows redirects, explains errors
                        await self._ctx.retry.call(attempt, is_transient=is_transient)
                        await anyio.to_thread.run_sync(hasher.feed_from, i, fd, offset,
                                                       received[i])
                except BaseException as e:
                    hasher.fail(f"range {i} of {key} failed: {type(e).__name__}")
                    raise
                finally:
                    os.close(fd)

        with self._translated(key, "downloading", "s3:GetObject", writing=False):
            client = await self._get_client()
            await anyio.to_thread.run_sync(
                lambda: os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True))
            try:
                async with anyio.create_task_group() as tg:
                    for i in range(len(ranges)):
                        tg.start_soon(fetch, i)
                if hasher.fed != len(ranges):
                    raise AssertionError(f"hashed {hasher.fed} of {len(ranges)} ranges of {key}")
                await anyio.to_thread.run_sync(os.replace, tmp, dest)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_unlink_quietly, tmp)
                raise
        return hasher.digest.hexdigest()
