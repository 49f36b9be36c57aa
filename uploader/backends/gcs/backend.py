"""The Google Cloud Storage backend: gcloud-aio-storage's client, with resumable uploads.

One aiohttp session per backend (so per event loop), opened lazily inside the loop.
gcloud-aio-storage resolves the endpoint (``STORAGE_EMULATOR_HOST`` for an emulator, as
Google's own clients do), adds the bearer token, and makes the metadata, listing and
delete requests; it does not retry (the only retry layer is ``TransferContext.retry``,
applied to each request on its own). Data moves through requests made here on the same
session, because gcloud-aio-storage sends a file in one request with no checksum:

- a file below ``multipart_threshold`` (and every manifest) is one multipart upload whose
  metadata carries the CRC32C of its bytes, so GCS refuses it if they arrive otherwise;
- a bigger file goes through a resumable upload session, in chunks of ``part_size``
  (rounded to the 256 KiB GCS requires). A chunk is read only while its request holds a
  limiter slot, so memory is one chunk per file in flight. The file's SHA-256 and CRC32C
  are computed as chunks are read, in order, and the last request carries the CRC32C in
  ``X-Goog-Hash`` (GCS refuses to finalize the object if it differs). The chunks of one
  file go in order (a session takes them in order); files go in parallel. A chunk whose
  request failed is resumed from the offset the service reports it persisted; a session
  that is lost or finished with other bytes is abandoned (cancelled with ``DELETE``) and
  the file sent again in a new one. Sessions cannot be listed, so there is nothing for
  :meth:`list_uploads` to return: an abandoned session holds no object and expires
  after a week;
- a load of a file below ``multipart_threshold`` is one GET whose bytes are checked
  against the CRC32C GCS sends with them; a bigger one is ranged GETs of ``part_size`` in
  parallel, written in place and hashed in range order.

Every upload's result names the CRC32C GCS stored; the backend checks it is the one it
computed (an emulator that does not verify what it is sent is still caught).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import anyio
import anyio.to_thread

from ...errors import CheckpointError, first_error
from ..base import StoredObject, TransferContext, Upload, stored
from ..plane.parts import InOrderDigest
from .auth import CredentialsToken
from .checksums import Crc32c, crc32c_of, crc32c_of_file, read_chunk
from .errors import (
    Mismatch,
    SessionLost,
    explain,
    is_storage_error,
    is_transient,
    status_of,
)

__all__ = ["GCSBackend", "chunk_size_for"]

T = TypeVar("T")

GCS_API = "https://storage.googleapis.com"
QUANTUM = 256 * 1024  # a resumable upload's chunks are multiples of this
_IO_CHUNK = 4 * 1024 * 1024
_SENT_REMEMBERED = 16384
_SESSIONS = 3  # resumable sessions tried for one file before giving up
_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)


def chunk_size_for(configured: int) -> int:
    """A resumable upload's chunk size: ``configured`` rounded down to 256 KiB, at least
    256 KiB (GCS refuses other sizes for any but the last chunk)."""
    return max(QUANTUM, configured // QUANTUM * QUANTUM)


def _pwrite_all(fd: int, chunks: list[bytes], offset: int, crc: Crc32c | None) -> None:
    for chunk in chunks:
        if crc is not None:
            crc.update(chunk)
        view = memoryview(chunk)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n


class _Partial(SessionLost):
    """The session persisted less of a chunk than was sent: the rest is sent again."""


def _chunk_transient(exc: BaseException) -> bool:
    return isinstance(exc, _Partial) or (is_transient(exc) and not isinstance(exc, SessionLost))


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _mtime(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


def _stored_crc(headers: Any) -> str | None:
    """The CRC32C in an ``X-Goog-Hash`` header (``crc32c=...,md5=...``), if any."""
    for header in headers.getall("x-goog-hash", ()):
        for item in header.split(","):
            name, _, value = item.strip().partition("=")
            if name == "crc32c":
                return str(value)
    return None


async def _raise_for(resp: aiohttp.ClientResponse) -> None:
    """An ``aiohttp.ClientResponseError`` carrying Google's error message, for a reply
    that is not a success (2xx) nor a resumable upload's 308."""
    if resp.status < 300 or resp.status == 308:
        return
    text = (await resp.text(errors="replace"))[:500]
    with contextlib.suppress(ValueError, KeyError, TypeError):
        text = json.loads(text)["error"]["message"]
    raise aiohttp.ClientResponseError(resp.request_info, resp.history, status=resp.status,
                                      message=text, headers=resp.headers)


class GCSBackend:
    """Keys under ``gs://bucket/prefix``. See the module docstring for how it transfers.

    ``endpoint``: the API's root (an emulator's URL); Google's by default. ``credentials``:
    a function returning google-auth credentials, called once, in a worker thread, when a
    request first needs them; None sends no credentials (an emulator).
    """

    kind = "gs"

    def __init__(
        self,
        ctx: TransferContext,
        *,
        bucket: str,
        prefix: str,
        endpoint: str | None = None,
        credentials: Callable[[], Any] | None = None,
        page_size: int = 1000,
    ) -> None:
        self._ctx = ctx
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self.endpoint = (endpoint or GCS_API).rstrip("/")
        self._token = CredentialsToken(credentials) if credentials is not None else None
        self.page_size = page_size
        self._storage: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._open_lock = anyio.Lock()
        # Object name -> the CRC32C GCS keeps for what this backend stored there.
        self._sent: collections.OrderedDict[str, str] = collections.OrderedDict()

    # -- plumbing ------------------------------------------------------------------

    def _okey(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url_of(self, key: str) -> str:
        return f"gs://{self.bucket}/{self._okey(key)}"

    def _object_url(self, okey: str) -> str:
        return f"{self.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o/" \
               f"{quote(okey, safe='')}"

    async def _client(self) -> Any:
        if self._storage is None:
            async with self._open_lock:
                if self._storage is None:
                    from gcloud.aio.storage import Storage

                    limit = self._ctx.settings.upload_concurrency * 2 + 16
                    self._session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=limit), timeout=_TIMEOUT,
                        auto_decompress=False)
                    self._storage = Storage(
                        session=self._session,  # type: ignore[arg-type]
                        api_root=self.endpoint, api_is_dev=self._token is None,
                        token=self._token)  # type: ignore[arg-type]
        return self._storage

    async def _headers(self) -> dict[str, str]:
        return {} if self._token is None else await self._token.headers()

    async def aclose(self) -> None:
        session, self._session, self._storage = self._session, None, None
        if session is not None:
            await session.close()

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

    def _error(self, exc: BaseException, key: str, doing: str, permission: str, *,
               writing: bool) -> CheckpointError:
        where = f"{self.url_of(key)} (bucket {self.bucket!r}, object {self._okey(key)!r})"
        return explain(exc, bucket=self.bucket, key=key, where=where, doing=doing,
                       permission=permission, writing=writing)

    def _remember_sent(self, okey: str, crc: str) -> None:
        self._sent[okey] = crc
        self._sent.move_to_end(okey)
        while len(self._sent) > _SENT_REMEMBERED:
            self._sent.popitem(last=False)

    def _check_result(self, okey: str, result: dict[str, Any], size: int, crc: str) -> None:
        """The object GCS says it stored is the one we sent: its size and its CRC32C."""
        got_size, got_crc = int(result.get("size", -1)), result.get("crc32c")
        if got_size != size or got_crc != crc:
            raise Mismatch(f"gs://{self.bucket}/{okey} was stored with {got_size} bytes and "
                              f"CRC32C {got_crc}, not the {size} bytes with CRC32C {crc} sent")

    # -- writing -------------------------------------------------------------------

    async def _put_whole(self, okey: str, data: bytes, crc: str) -> None:
        storage = await self._client()

        async def attempt() -> None:
            # A multipart upload whose metadata names the CRC32C: GCS verifies it.
            result = await storage.upload(
                self.bucket, okey, data, content_type="application/octet-stream",
                metadata={"crc32c": crc}, force_resumable_upload=False, timeout=300)
            self._check_result(okey, result, len(data), crc)

        await self._request(attempt)
        self._remember_sent(okey, crc)

    async def put_bytes(self, key: str, data: bytes) -> None:
        with self._translated(key, "writing", "storage.objects.create"):
            await self._put_whole(self._okey(key), data, crc32c_of(data))

    async def put_file(self, key: str, path: str, size: int) -> str:
        with self._translated(key, "uploading to", "storage.objects.create"):
            okey = self._okey(key)
            if size >= self._ctx.settings.multipart_threshold:
                return await self._put_resumable(okey, path, size)

            def read() -> tuple[bytes, str, str]:
                sha, crc = hashlib.sha256(), Crc32c()
                fd = os.open(path, os.O_RDONLY)
                try:
                    data = read_chunk(fd, 0, size, sha, crc)
                finally:
                    os.close(fd)
                return data, sha.hexdigest(), crc.b64()

            async with self._ctx.slot():  # the file's bytes exist only while a slot is held
                data, sha256, crc = await anyio.to_thread.run_sync(read)
            await self._put_whole(okey, data, crc)
            return sha256

    async def _put_resumable(self, okey: str, path: str, size: int) -> str:
        """Upload in a resumable session; a lost session is replaced by a new one."""
        for session_no in range(1, _SESSIONS + 1):
            try:
                return await self._one_session(okey, path, size)
            except (SessionLost, Mismatch):
                if session_no == _SESSIONS:
                    raise
        raise AssertionError("unreachable")

    async def _start_session(self, okey: str, size: int) -> str:
        session = self._session
        assert session is not None
        url = f"{self.endpoint}/upload/storage/v1/b/{quote(self.bucket, safe='')}/o"

        async def attempt() -> str:
            headers = {**await self._headers(), "X-Upload-Content-Type": "application/octet-stream",
                       "X-Upload-Content-Length": str(size)}
            async with session.post(url, params={"uploadType": "resumable", "name": okey},
                                    json={"name": okey}, headers=headers) as resp:
                await _raise_for(resp)
                return str(resp.headers["Location"])

        return await self._request(attempt)

    async def _cancel(self, session_uri: str) -> None:
        """Best effort: the original error is what the user needs to see. GCS answers a
        cancelled session with 499; an emulator may not know the request."""
        session = self._session
        if session is None:
            return
        with contextlib.suppress(Exception):
            with anyio.fail_after(30):
                async with session.delete(session_uri, headers=await self._headers()) as resp:
                    await resp.read()

    async def _one_session(self, okey: str, path: str, size: int) -> str:
        await self._client()
        step = chunk_size_for(self._ctx.settings.part_size)
        sha, crc = hashlib.sha256(), Crc32c()
        uri = await self._start_session(okey, size)
        try:
            fd = await anyio.to_thread.run_sync(os.open, path, os.O_RDONLY)
            try:
                offset = 0
                while offset < size:
                    length = min(step, size - offset)
                    async with self._ctx.slot():  # a chunk's buffer exists only under a slot
                        data = await anyio.to_thread.run_sync(read_chunk, fd, offset, length,
                                                              sha, crc)
                        last = offset + length == size
                        result = await self._send_chunk(uri, data, offset, size,
                                                        crc.b64() if last else None)
                        del data  # freed before the next chunk is read
                    stored(length)
                    offset += length
            finally:
                os.close(fd)
            assert result is not None
            self._check_result(okey, result, size, crc.b64())
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._cancel(uri)
            raise
        self._remember_sent(okey, crc.b64())
        return sha.hexdigest()

    async def _send_chunk(self, uri: str, data: bytes, offset: int, size: int,
                          crc: str | None) -> dict[str, Any] | None:
        """Send ``data`` (at ``offset`` of ``size`` bytes) to the session at ``uri``; the
        object's metadata where this was the last chunk (``crc``: the whole file's CRC32C).
        A failed attempt asks the session how much it persisted and sends the rest."""
        session = self._session
        assert session is not None
        end = offset + len(data)
        sent_from = offset  # where the next attempt starts

        async def status() -> int:
            """Bytes the session persisted (a status query); SessionLost if it is gone."""
            headers = {**await self._headers(), "Content-Range": f"bytes */{size}"}
            async with session.put(uri, headers=headers) as resp:
                if resp.status in (404, 410):
                    raise SessionLost(f"the upload session was lost (HTTP {resp.status})")
                await _raise_for(resp)
                if resp.status != 308:  # already complete: the last chunk had arrived
                    return size
                persisted = resp.headers.get("Range")
                return int(persisted.rpartition("-")[2]) + 1 if persisted else 0

        async def attempt() -> dict[str, Any] | None:
            nonlocal sent_from
            if attempts:  # a retry: resume where the session says it is
                sent_from = await status()
                if not offset <= sent_from <= end:
                    raise SessionLost(f"the upload session holds {sent_from} bytes; this "
                                      f"chunk is {offset}..{end}")
            attempts.append(1)
            body = memoryview(data)[sent_from - offset:]
            total = str(size) if end == size else "*"
            rng = f"bytes {sent_from}-{end - 1}/{total}" if body else f"bytes */{total}"
            headers = {**await self._headers(), "Content-Range": rng}
            if crc is not None:
                headers["X-Goog-Hash"] = f"crc32c={crc}"
            async with session.put(uri, data=body, headers=headers) as resp:
                if resp.status in (404, 410):
                    raise SessionLost(f"the upload session was lost (HTTP {resp.status})")
                await _raise_for(resp)
                if resp.status == 308:
                    persisted = resp.headers.get("Range")
                    got = int(persisted.rpartition("-")[2]) + 1 if persisted else 0
                    if got != end:
                        sent_from = got
                        raise _Partial(f"the session persisted {got} bytes, not {end}")
                    return None
                found: dict[str, Any] = await resp.json(content_type=None)
                return found

        attempts: list[int] = []
        # A lost session is not retried here: _put_resumable starts a new one.
        return await self._ctx.retry.call(attempt, is_transient=_chunk_transient)

    # -- reading -------------------------------------------------------------------

    async def get_bytes(self, key: str) -> bytes | None:
        okey = self._okey(key)

        async def attempt() -> bytes | None:
            session = self._session
            assert session is not None
            async with session.get(self._object_url(okey), params={"alt": "media"},
                                   headers=await self._headers()) as resp:
                if resp.status == 404:
                    return None
                await _raise_for(resp)
                data = await resp.read()
                stored = _stored_crc(resp.headers)
            if stored is not None and crc32c_of(data) != stored:
                raise Mismatch(f"{self.url_of(key)}: the bytes received do not match the "
                                  "CRC32C GCS sent with them")
            return data

        with self._translated(key, "reading", "storage.objects.get", writing=False):
            await self._client()
            return await self._request(attempt)

    async def _metadata(self, okey: str) -> dict[str, Any] | None:
        storage = await self._client()

        async def attempt() -> dict[str, Any] | None:
            try:
                found: dict[str, Any] = await storage.download_metadata(self.bucket, okey)
            except aiohttp.ClientResponseError as e:
                if e.status == 404:
                    return None
                raise
            return found

        return await self._request(attempt)

    async def stat(self, key: str) -> int | None:
        with self._translated(key, "looking at", "storage.objects.get", writing=False):
            found = await self._metadata(self._okey(key))
        return None if found is None else int(found["size"])

    async def confirm(self, key: str, size: int, sha256: str, local: str | bytes
                      ) -> str | None:
        okey = self._okey(key)
        with self._translated(key, "looking at", "storage.objects.get", writing=False):
            found = await self._metadata(okey)
        if found is None:
            return "it is gone"
        n = int(found.get("size", -1))
        if n != size:
            return f"it holds {n} bytes, not {size}"
        stored = found.get("crc32c")
        if not stored:
            return "the store keeps no checksum of it to compare with"
        expected = self._sent.get(okey)
        if expected is None:
            async with self._ctx.limiter:  # reads a local copy: bounded like every other read
                expected = await anyio.to_thread.run_sync(
                    lambda: crc32c_of(local[:size]) if isinstance(local, bytes)
                    else crc32c_of_file(local, size))
        if stored != expected:
            return f"its stored CRC32C checksum is {stored}, not the {expected} of its bytes"
        self._remember_sent(okey, stored)
        return None

    async def _listing(self, prefix: str) -> list[dict[str, Any]]:
        storage = await self._client()

        async def attempt() -> list[dict[str, Any]]:  # the whole listing, retried as one
            items: list[dict[str, Any]] = []
            token = ""
            while True:
                params = {"prefix": self._okey(prefix), "maxResults": str(self.page_size),
                          "fields": "items(name,size,updated),nextPageToken"}
                if token:
                    params["pageToken"] = token
                page = await storage.list_objects(self.bucket, params=params)
                items.extend(page.get("items", ()))
                token = page.get("nextPageToken") or ""
                if not token:
                    return items

        with self._translated(prefix, "listing", "storage.objects.list", writing=False):
            return await self._request(attempt)

    async def list_keys(self, prefix: str) -> list[str]:
        strip = len(self._okey(""))
        return [o["name"][strip:] for o in await self._listing(prefix)]

    async def list_objects(self, prefix: str) -> list[StoredObject]:
        strip = len(self._okey(""))
        return [StoredObject(o["name"][strip:], int(o.get("size", 0)), _mtime(o["updated"]))
                for o in await self._listing(prefix)]

    async def delete_keys(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        """One DELETE per key, as many at once as the limiter allows; a key already gone
        counts as deleted. Refusals are returned per key; a missing bucket or a refusal
        of every key raises."""
        storage = await self._client()
        failed: list[tuple[str, str]] = []
        refused: list[BaseException] = []

        async def delete(key: str) -> None:
            async def attempt() -> None:
                try:
                    await storage.delete(self.bucket, self._okey(key))
                except aiohttp.ClientResponseError as e:
                    if e.status != 404:
                        raise

            try:
                await self._request(attempt)
            except Exception as e:
                if not is_storage_error(e):
                    raise
                refused.append(e)
                failed.append((key, str(self._error(e, key, "deleting", "storage.objects.delete",
                                                    writing=False))))

        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(delete, key)
        if keys and len(refused) == len(keys) and status_of(refused[0]) in (401, 403):
            with self._translated(keys[0], f"deleting {len(keys)} key(s), the first",
                                  "storage.objects.delete", writing=False):
                raise refused[0]
        return failed

    async def list_uploads(self, prefix: str) -> list[Upload]:
        """Always empty: GCS has no way to list resumable upload sessions. A session this
        backend abandons is cancelled then; one a killed process left behind holds no
        object, costs nothing, and expires after a week."""
        return []

    async def abort_upload(self, key: str, upload_id: str) -> None:
        """Cancel a resumable upload session, given its URI as ``upload_id``."""
        if upload_id.startswith(("http://", "https://")):
            await self._client()
            await self._cancel(upload_id)

    async def get_file(self, key: str, dest: str, size: int) -> str:
        okey = self._okey(key)
        step = self._ctx.settings.part_size
        if size < self._ctx.settings.multipart_threshold:
            ranges = [(0, size)]  # one GET without a Range header, checked by its CRC32C
        else:
            ranges = [(o, min(step, size - o)) for o in range(0, size, step)]
        hasher = InOrderDigest()
        tmp = f"{dest}.tmp-{uuid.uuid4().hex}"

        async def fetch(i: int) -> None:
            offset, length = ranges[i]
            whole = len(ranges) == 1
            received = 0

            async def attempt() -> None:
                nonlocal received
                session = self._session
                assert session is not None
                headers = await self._headers()
                if not whole:
                    headers["Range"] = f"bytes={offset}-{offset + length - 1}"
                crc = Crc32c() if whole else None
                async with session.get(self._object_url(okey), params={"alt": "media"},
                                       headers=headers) as resp:
                    await _raise_for(resp)
                    if not whole and resp.content_length != length:
                        raise CheckpointError(f"{self.url_of(key)}: asked for {length} bytes at "
                                              f"{offset}, got {resp.content_length}")
                    pos = offset
                    while True:
                        batch, n = [], 0
                        while n < _IO_CHUNK and (chunk := await resp.content.read(_IO_CHUNK - n)):
                            batch.append(chunk)
                            n += len(chunk)
                        if not batch:
                            break
                        await anyio.to_thread.run_sync(_pwrite_all, fd, batch, pos, crc)
                        pos += n
                    stored = _stored_crc(resp.headers)
                if crc is not None and stored is not None and crc.b64() != stored:
                    raise Mismatch(f"{self.url_of(key)}: the bytes received do not match "
                                      "the CRC32C GCS sent with them")
                received = pos - offset

            async with self._ctx.slot():  # the file is open only while the request holds a slot
                fd = await anyio.to_thread.run_sync(os.open, tmp, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    await self._ctx.retry.call(attempt, is_transient=is_transient)
                    await anyio.to_thread.run_sync(hasher.feed_from, i, fd, offset, received)
                except BaseException as e:
                    hasher.fail(f"range {i} of {key} failed: {type(e).__name__}")
                    raise
                finally:
                    os.close(fd)

        with self._translated(key, "downloading", "storage.objects.get", writing=False):
            await self._client()
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
