"""The Azure Blob Storage backend: azure-storage-blob's asyncio client, block blobs.

One container client per backend (so per event loop), opened lazily inside the loop and
reused by every checkpoint. The SDK is told not to retry (``retry_total=0``): the only retry
layer is ``TransferContext.retry``, applied to each request on its own, so a failed block
re-sends that block only.

A file below ``Settings.multipart_threshold`` is one Put Blob; a larger one is staged in
blocks (Put Block, several in flight) and committed with one Put Block List. Every body
carries its MD5 as ``Content-MD5``, which the service verifies before it keeps the bytes; the
commit sets the blob's own ``Content-MD5`` to the MD5 of the whole file, computed while the
blocks were read, so :meth:`AzureBackend.confirm` compares what the service keeps. A block's
buffer exists, and its file is open, only while its request holds a limiter slot, taken
before the block is read.

Each Put Block, and the one Put Blob of a file below the threshold, goes to a data plane
(:mod:`.dataplane`), in the upload worker process or in worker threads as
``Settings.uploader`` says (:mod:`..plane.planes`, shared with S3), which reads the bytes,
hashes them and sends them with the SDK's synchronous client, so that they stay off the
training loop's GIL. This event loop coordinates: which blocks, retries, the commit, the
clean-up. Everything else (manifests, the commit, listings, loads) goes through the
asyncio client here.

Blocks staged for a blob that was never committed stay in the account, invisible to plain
listings, for up to 7 days. :meth:`AzureBackend.list_uploads` reports such blobs (a listing
that includes uncommitted blobs, minus the committed ones) and :meth:`abort_upload` deletes
one, so retention's debris clean-up removes what a killed writer staged.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import inspect
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.storage.blob import BlobBlock, ContentSettings
from azure.storage.blob.aio import ContainerClient

from ...config import MiB, UploaderMode
from ...errors import CheckpointError, UploadError, first_error
from ..base import StoredObject, TransferContext, Upload, stored
from ..plane.jobs import Outcome
from ..plane.planes import Plane, ProcessPlane, ThreadPlane
from .blocks import FileHashes, b64md5, md5_of_file
from .dataplane import AzureSpec, BlockJob, portable_credential, split_digests
from .errors import NOT_FOUND, error_code, explain, is_storage_error, is_transient

__all__ = ["AzureBackend", "block_size_for"]

T = TypeVar("T")

MAX_BLOCKS = 50_000
MAX_BLOCK_SIZE = 4000 * MiB
MAX_BLOB_SIZE = MAX_BLOCKS * MAX_BLOCK_SIZE
_SMALL_READS = 64  # manifests read at once, beside the transfer limiter
_READ_BLOCK = 1 * MiB
_SENT_REMEMBERED = 16384  # blobs whose MD5 is remembered as sent (see confirm())
UNCOMMITTED = "uncommitted-blocks"  # the upload id list_uploads gives a never-committed blob
_SCOPE = "https://storage.azure.com/.default"
_TOKEN_MARGIN = 600  # seconds of life a token handed to the data plane has left at least


def block_size_for(size: int, configured: int) -> int:
    """The block size for a file of ``size`` bytes: at least ``configured``, and large
    enough (rounded up to a whole MiB) that no file needs more than 50,000 blocks."""
    needed = -(-size // MAX_BLOCKS)
    needed = -(-needed // MiB) * MiB
    return max(configured, needed)


def _block_id(n: int) -> str:
    return f"block-{n:06d}"  # every id of a blob the same length, as the service requires


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _not_found(exc: BaseException) -> bool:
    """A missing blob (a missing container is an error to report, not an absent key)."""
    if isinstance(exc, ResourceNotFoundError) and error_code(exc) != "ContainerNotFound":
        return True
    return error_code(exc) in NOT_FOUND


class ThreadedTokenCredential:
    """An asyncio token credential that asks a synchronous one, in a worker thread."""

    def __init__(self, credential: Any) -> None:
        self.credential = credential

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(
            functools.partial(self.credential.get_token, *scopes, **kwargs))

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> ThreadedTokenCredential:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def _is_async_token(credential: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(credential, "get_token", None))


def _is_sync_token(credential: Any) -> bool:
    get_token = getattr(credential, "get_token", None)
    return get_token is not None and not inspect.iscoroutinefunction(get_token)


class AzureBackend:
    """Blobs under ``container/prefix`` of the storage account at ``account_url``.

    ``credential``: an ``AzureNamedKeyCredential``, a SAS token, or a token credential.
    A synchronous token credential (what Metaflow's Azure client providers make) is asked
    from a worker thread. A key or a SAS is handed to the data plane once; a token
    credential does not pickle, so the data plane gets a bearer token from it with each
    block instead (:mod:`.dataplane`).
    ``verify``: True, False, or the path of a CA bundle for the endpoint's certificate.
    """

    kind = "azure"

    def __init__(self, ctx: TransferContext, *, account_url: str, container: str,
                 prefix: str, credential: Any = None, verify: bool | str = True) -> None:
        self._ctx = ctx
        self.account_url = account_url.rstrip("/")
        self.container = container
        self.prefix = prefix.strip("/")
        self.url = f"az://{container}/{self.prefix}" if self.prefix else f"az://{container}"
        self._credential = credential
        self._verify = verify
        self._client: ContainerClient | None = None
        self._plane: Plane | None = None
        self._ids = itertools.count(1)  # request and file ids for the data plane
        self._token: tuple[str, int] | None = None  # the newest bearer token, if any
        self._token_lock = anyio.Lock()
        self._client_lock = anyio.Lock()
        self._small_reads = anyio.CapacityLimiter(_SMALL_READS)
        self._sent: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    # -- plumbing ------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url_of(self, key: str) -> str:
        return f"az://{self.container}/{self._name(key)}"

    async def _get_client(self) -> ContainerClient:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    part = self._ctx.settings.part_size
                    # One GET per range, and for a file below the threshold, one in all.
                    whole = max(part, self._ctx.settings.multipart_threshold)
                    credential = self._credential
                    if _is_sync_token(credential):
                        credential = ThreadedTokenCredential(credential)
                    self._plane = self._new_plane()
                    self._client = ContainerClient(
                        self.account_url, self.container, credential=credential,
                        connection_verify=self._verify, retry_total=0,
                        connection_timeout=10, read_timeout=120,
                        # A response is read in pieces of this size, each an await on this
                        # loop: the SDK's default (4 KiB) makes a 16 MiB range 4,096 of them.
                        connection_data_block_size=_READ_BLOCK,
                        max_single_get_size=whole, max_chunk_get_size=part,
                        max_single_put_size=whole)
        return self._client

    def _new_plane(self) -> Plane:
        settings = self._ctx.settings
        portable = portable_credential(self._credential)
        spec = AzureSpec(self.account_url, self.container, self._verify,
                         settings.upload_concurrency, credential=portable,
                         bearer=portable is None and self._credential is not None)
        threads = settings.upload_concurrency
        if settings.uploader is UploaderMode.PROCESS:
            return ProcessPlane(spec, threads, timeout=settings.worker_timeout,
                                min_rate=settings.worker_min_rate, log=self._ctx.log)
        return ThreadPlane(spec, threads)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        plane, self._plane = self._plane, None
        try:
            if client is not None:
                await client.close()
        finally:
            if plane is not None:
                await plane.aclose()

    async def _bearer(self) -> tuple[str, int] | None:
        """A token for the data plane, where the credential is a token credential: the
        last one while it has :data:`_TOKEN_MARGIN` seconds left, else a new one."""
        if portable_credential(self._credential) is not None or self._credential is None:
            return None
        if self._token is not None and self._token[1] - time.time() > _TOKEN_MARGIN:
            return self._token
        async with self._token_lock:
            if self._token is None or self._token[1] - time.time() <= _TOKEN_MARGIN:
                credential = self._credential
                if _is_async_token(credential):
                    got = await credential.get_token(_SCOPE)
                else:
                    got = await anyio.to_thread.run_sync(credential.get_token, _SCOPE)
                self._token = (str(got.token), int(got.expires_on))
            return self._token

    async def _run(self, job: BlockJob) -> Outcome:
        """Send ``job`` through the data plane, retried as one request. A retry must read
        the same bytes as the first attempt (the file's digests already have them)."""
        assert self._plane is not None
        plane, expect = self._plane, None

        async def attempt() -> Outcome:
            nonlocal expect
            out = await plane.run(dataclasses.replace(
                job, job_id=next(self._ids), token=await self._bearer(), expect=expect))
            expect = expect or out.checksum
            if out.error is not None:
                raise out.error
            return out

        return await self._retried(attempt)

    async def _retried(self, fn: Callable[[], Awaitable[T]]) -> T:
        return await self._ctx.retry.call(fn, is_transient=is_transient)

    async def _request(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One request, retried on its own, holding one limiter slot."""
        async with self._ctx.slot():
            return await self._retried(fn)

    @contextlib.contextmanager
    def _translated(self, key: str, doing: str, *, writing: bool = True) -> Iterator[None]:
        """Turn a storage error that survived the retries into one that says what to do."""
        try:
            yield
        except Exception as e:
            err = first_error(e) if isinstance(e, BaseExceptionGroup) else e
            if is_storage_error(err):
                where = (f"{self.url_of(key)} (container {self.container!r} at "
                         f"{self.account_url}, blob {self._name(key)!r})")
                raise explain(err, container=self.container, key=key, where=where,
                              doing=doing, writing=writing) from err
            if err is not e:
                raise err from None
            raise

    def _remember_sent(self, name: str, md5: bytes) -> None:
        self._sent[name] = md5
        self._sent.move_to_end(name)
        while len(self._sent) > _SENT_REMEMBERED:
            self._sent.popitem(last=False)

    # -- writing -------------------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes) -> None:
        with self._translated(key, "writing"):
            client, name = await self._get_client(), self._name(key)
            md5 = await anyio.to_thread.run_sync(md5_of_file, data, len(data))
            await self._request(lambda: self._put_blob(client, name, data, md5))
            self._remember_sent(name, md5)

    @staticmethod
    async def _put_blob(client: ContainerClient, name: str, data: bytes,
                        md5: bytes) -> None:
        # One Put Blob: atomic. Content-MD5 is verified by the service on arrival, and
        # the same MD5 is kept as the blob's own (x-ms-blob-content-md5).
        await client.get_blob_client(name).upload_blob(
            data, length=len(data), overwrite=True, blob_type="BlockBlob",
            content_settings=ContentSettings(content_md5=bytearray(md5)),
            headers={"Content-MD5": b64md5(md5)})

    async def put_file(self, key: str, path: str, size: int) -> str:
        if size > MAX_BLOB_SIZE:
            raise UploadError(f"{path} is {size} bytes; a block blob holds at most "
                              f"{MAX_BLOB_SIZE} bytes ({self.url_of(key)}).", key=key)
        with self._translated(key, "uploading to"):
            if size < self._ctx.settings.multipart_threshold:
                return await self._put_single(key, path, size)
            return await self._put_blocks(key, path, size)

    async def _put_single(self, key: str, path: str, size: int) -> str:
        name = self._name(key)
        await self._get_client()
        async with self._ctx.slot():  # the slot covers the open file and the bytes too
            out = await self._run(BlockJob(job_id=0, blob=name, block_id="", path=path,
                                           offset=0, length=size, index=0))
        assert out.digest is not None
        sha256, md5 = split_digests(out.digest)
        self._remember_sent(name, md5)
        return sha256

    async def _put_blocks(self, key: str, path: str, size: int) -> str:
        client, name = await self._get_client(), self._name(key)
        assert self._plane is not None
        plane = self._plane
        blob = client.get_blob_client(name)
        step = block_size_for(size, self._ctx.settings.part_size)
        limiter = self._ctx.limiter
        file_id = next(self._ids)
        ids: list[str] = []
        sums: dict[int, str] = {}  # block index -> the base64 MD5 it was sent with

        async def send(index: int, offset: int, length: int, token: object) -> None:
            try:
                out = await self._run(BlockJob(
                    job_id=0, blob=name, block_id=ids[index], path=path, offset=offset,
                    length=length, index=index, file_id=file_id))
                assert out.checksum is not None
                sums[index] = out.checksum
                stored(length)
            finally:
                limiter.release_on_behalf_of(token)

        try:
            try:
                async with anyio.create_task_group() as tg:
                    for index, offset in enumerate(range(0, size, step)):
                        ids.append(_block_id(index))
                        token = object()
                        # Taken in block order, before the block is read: bounds memory and
                        # open files, and the data plane hashes blocks in this order.
                        await limiter.acquire_on_behalf_of(token)
                        tg.start_soon(send, index, offset, min(step, size - offset), token)
            except BaseExceptionGroup as eg:
                raise first_error(eg) from None
            sha256, md5 = split_digests(await plane.file_digest(file_id, path=path, parts=[
                (i * step, min(step, size - i * step), sums[i]) for i in range(len(ids))]))
            # Committing the same list again after a lost answer commits it again: blocks
            # already committed are found by their ids ("latest" looks at both lists).
            await self._request(lambda: blob.commit_block_list(
                [BlobBlock(i) for i in ids],
                content_settings=ContentSettings(content_md5=bytearray(md5))))
        except BaseException:
            with anyio.move_on_after(60, shield=True):
                await plane.drop_file(file_id)
                with contextlib.suppress(Exception):
                    await self.abort_upload(key, UNCOMMITTED)
            raise
        self._remember_sent(name, md5)
        return sha256

    async def digest_file(self, path: str, size: int) -> str:
        """The SHA-256 of a local file an incremental save may find unchanged, read by the
        data plane (the worker process, by default) rather than under the task's GIL."""
        await self._get_client()  # the plane comes with the client
        assert self._plane is not None
        return await self._plane.hash_file(path, size)

    # -- reading -------------------------------------------------------------------

    async def get_bytes(self, key: str) -> bytes | None:
        async def attempt() -> bytes | None:
            try:
                stream = await client.get_blob_client(self._name(key)).download_blob()
                data: bytes = await stream.readall()
            except HttpResponseError as e:
                if _not_found(e):
                    return None
                raise
            return data

        with self._translated(key, "reading", writing=False):
            client = await self._get_client()
            async with self._small_reads:
                return await self._retried(attempt)

    async def _properties(self, key: str) -> Any:
        """The blob's properties, or None where there is no committed blob."""
        client = await self._get_client()

        async def attempt() -> Any:
            try:
                return await client.get_blob_client(self._name(key)).get_blob_properties()
            except HttpResponseError as e:
                if _not_found(e):
                    return None
                raise

        return await self._request(attempt)

    async def stat(self, key: str) -> int | None:
        with self._translated(key, "looking at", writing=False):
            props = await self._properties(key)
        return None if props is None else int(props.size)

    async def confirm(self, key: str, size: int, sha256: str, local: str | bytes
                      ) -> str | None:
        # By the blob's Content-MD5, which the service keeps: the MD5 this backend set (a
        # Put Blob's verified body, or the whole file's at the block list's commit).
        with self._translated(key, "looking at", writing=False):
            props = await self._properties(key)
        if props is None:
            return "it is gone"
        if int(props.size) != size:
            return f"it holds {props.size} bytes, not {size}"
        stored = props.content_settings.content_md5
        if not stored:
            return "the store keeps no Content-MD5 of it to compare with"
        stored = bytes(stored)
        name = self._name(key)
        expected = self._sent.get(name)
        if expected is None:
            async with self._ctx.limiter:  # reads a local copy: bounded like other reads
                expected = await anyio.to_thread.run_sync(md5_of_file, local, size)
        if stored != expected:
            return (f"its stored Content-MD5 is {b64md5(stored)}, not the {b64md5(expected)} "
                    "of its bytes")
        self._remember_sent(name, stored)
        return None

    async def get_file(self, key: str, dest: str, size: int) -> str:
        step = block_size_for(size, self._ctx.settings.part_size)
        if size < self._ctx.settings.multipart_threshold:
            ranges = [(0, size)]  # one GET without a range
        else:
            ranges = [(o, min(step, size - o)) for o in range(0, size, step)]
        hashes = FileHashes()
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"
        name = self._name(key)

        async def fetch(i: int) -> None:
            offset, length = ranges[i]
            whole = len(ranges) == 1
            blob = client.get_blob_client(name)

            async def attempt() -> bytes:
                if whole:
                    stream = await blob.download_blob(max_concurrency=1)
                else:
                    stream = await blob.download_blob(offset=offset, length=length,
                                                      max_concurrency=1)
                data: bytes = await stream.readall()
                if not whole and len(data) != length:
                    raise CheckpointError(f"{self.url_of(key)}: asked for {length} bytes at "
                                          f"{offset}, got {len(data)}")
                return data

            async with self._ctx.slot():  # the range's bytes exist only while it holds a slot
                try:
                    data = await self._retried(attempt)
                    await anyio.to_thread.run_sync(self._write_range, fd, data, offset, i,
                                                   hashes)
                except BaseException as e:
                    hashes.fail(f"range {i} of {key} failed: {type(e).__name__}")
                    raise

        with self._translated(key, "downloading", writing=False):
            client = await self._get_client()
            await anyio.to_thread.run_sync(
                lambda: os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True))
            fd = await anyio.to_thread.run_sync(os.open, tmp, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    async with anyio.create_task_group() as tg:
                        for i in range(len(ranges)):
                            tg.start_soon(fetch, i)
                finally:
                    os.close(fd)
                if hashes.fed != len(ranges):
                    raise AssertionError(f"hashed {hashes.fed} of {len(ranges)} ranges of {key}")
                await anyio.to_thread.run_sync(os.replace, tmp, dest)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_unlink_quietly, tmp)
                raise
        return hashes.sha256.hexdigest()

    @staticmethod
    def _write_range(fd: int, data: bytes, offset: int, i: int, hashes: FileHashes) -> None:
        _pwrite_all(fd, data, offset)
        hashes.feed(i, memoryview(data))

    # -- listing and deleting ------------------------------------------------------

    async def _list(self, prefix: str, *, uncommitted: bool = False) -> list[tuple[str, Any]]:
        """``(key, properties)`` of every blob under ``prefix``."""
        strip = len(self._name(""))
        include = ["uncommittedblobs"] if uncommitted else None

        async def attempt() -> list[tuple[str, Any]]:  # retried as one request
            client = await self._get_client()
            return [(b.name[strip:], b) async for b in client.list_blobs(
                name_starts_with=self._name(prefix), include=include)]

        return await self._request(attempt)

    async def list_keys(self, prefix: str) -> list[str]:
        with self._translated(prefix, "listing", writing=False):
            return [key for key, _ in await self._list(prefix)]

    async def list_objects(self, prefix: str) -> list[StoredObject]:
        with self._translated(prefix, "listing", writing=False):
            return [StoredObject(key, int(b.size or 0), b.last_modified.timestamp())
                    for key, b in await self._list(prefix)]

    async def delete_keys(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        """One Delete Blob per key, several at once (each holding a limiter slot), each
        retried on its own; a key already gone counts as deleted."""
        failed: list[tuple[str, str]] = []
        client = await self._get_client()

        async def delete(key: str) -> None:
            async def attempt() -> None:
                try:
                    await client.get_blob_client(self._name(key)).delete_blob(
                        delete_snapshots="include")
                except HttpResponseError as e:
                    if not _not_found(e):
                        raise

            try:
                with self._translated(key, "deleting", writing=False):
                    await self._request(attempt)
            except CheckpointError as e:
                if isinstance(e.__cause__, HttpResponseError) and \
                        error_code(e.__cause__) == "ContainerNotFound":
                    raise  # the request as a whole is refused: say so once
                failed.append((key, str(e)))

        try:
            async with anyio.create_task_group() as tg:
                for key in keys:
                    tg.start_soon(delete, key)
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        return failed

    async def list_uploads(self, prefix: str) -> list[Upload]:
        """Blobs under ``prefix`` with staged blocks that were never committed: in a listing
        that includes uncommitted blobs, and not in one that does not."""
        with self._translated(prefix, "listing uncommitted blobs under", writing=False):
            every = await self._list(prefix, uncommitted=True)
            committed = {key for key, _ in await self._list(prefix)}
        out: list[Upload] = []
        for key, b in every:
            if key in committed:
                continue
            when = b.creation_time or b.last_modified
            out.append(Upload(key, UNCOMMITTED, when.timestamp()))
        return out

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Delete the never-committed blob ``key`` and its staged blocks. A blob committed
        meanwhile is left alone (its stale blocks, if any, the service drops itself)."""
        client = await self._get_client()
        with self._translated(key, "deleting the uncommitted blocks of", writing=False):
            if await self._properties(key) is not None:
                return

            async def attempt() -> None:
                try:
                    await client.get_blob_client(self._name(key)).delete_blob()
                except HttpResponseError as e:
                    if not _not_found(e):
                        raise

            await self._request(attempt)

