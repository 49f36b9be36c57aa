"""The data plane of an S3 upload: read, hash, sign and send one object or part.

One :meth:`DataPlane.run` call does the whole per-byte path of a request in the calling
(worker) thread: open the file, read the part once into its own buffer, feed it to the
file's running SHA-256 (in part order) and to the part's own CRC32, sign the request
with the part's checksum (the body itself is ``UNSIGNED-PAYLOAD``: S3 verifies the
checksum) and send it with one system call (:mod:`.sender`). No event loop is
involved, so the thread needs the GIL only a few times per part; that is what lets an
upload keep its speed while a training loop holds the GIL.

The same object runs in a thread pool of the task's own process or in a spawned worker
process (:mod:`..plane.worker`); either way the event-loop thread stays the coordinator: it
decides what to send, retries failed requests (a retry sends the same part again, and the
re-read bytes must have the checksum of the first read) and owns the commit protocol.
Everything crossing to a worker process is a plain picklable value.

The planes and the worker process run any data plane that keeps the same shape
(:mod:`..plane.jobs`: a spec, its jobs, a runner): the Azure one is
:mod:`..azure.dataplane`. A spec says which data plane it makes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Any

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ..plane.jobs import Cancelled, Outcome, Spans
from ..plane.parts import BufferPool, PartBody, digest_of_parts, read_part
from .sender import BlockingSender, sync_hook
from .transport import ClientCert

__all__ = ["ClientSpec", "Creds", "DataPlane", "PartJob"]


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    """How to reach the store; the same for every request of a backend. ``verify`` and
    ``client_cert`` are what the backend's client resolved (:mod:`.transport`)."""

    endpoint_url: str | None
    region: str | None
    verify: bool | str
    s3_options: dict[str, Any]  # the client's ``Config(s3=...)``: addressing style and such
    connect_timeout: float = 10
    read_timeout: float = 120
    proxies: dict[str, str] | None = None
    proxies_config: dict[str, Any] | None = None
    client_cert: ClientCert = None
    direct: bool = True  # bodies go through the blocking sender, else botocore's own stack

    def plane(self) -> DataPlane:
        return DataPlane(self)

    def digest_again(self, path: str, parts: Spans) -> str:
        return digest_of_parts(path, parts)


@dataclasses.dataclass(frozen=True)
class Creds:
    access_key: str
    secret_key: str
    token: str | None


@dataclasses.dataclass(frozen=True)
class PartJob:
    """One request: a whole file (``upload_id`` None: PutObject) or one part of it."""

    job_id: int
    creds: Creds
    bucket: str
    key: str  # the object key, prefix included
    path: str
    offset: int
    length: int
    upload_id: str | None = None
    part_number: int = 1
    # Parts of one file share a running whole-file SHA-256 in the plane that runs them; 0 for
    # none (a part of a file whose digest was lost with a worker process: the coordinator
    # hashes that file again, from the part checksums, once its parts are sent).
    file_id: int = 0
    expect: str | None = None  # the checksum an earlier attempt read: a retry must match it

    @property
    def first_in_file(self) -> bool:
        return bool(self.file_id) and self.upload_id is not None and self.expect is None


class _File:
    __slots__ = ("digest", "failed", "next")

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.next = 1  # the part whose bytes the digest takes next
        self.failed: str | None = None


class DataPlane:
    """Thread-safe; one per backend (per process, for a worker process)."""

    def __init__(self, spec: ClientSpec) -> None:
        self.spec = spec
        self.sender = BlockingSender(verify=spec.verify, client_cert=spec.client_cert,
                                     connect_timeout=spec.connect_timeout,
                                     read_timeout=spec.read_timeout)
        self._lock = threading.Lock()
        self._order = threading.Condition(self._lock)
        self._files: dict[int, _File] = {}
        self._pool = BufferPool()
        self._clients: dict[Creds, Any] = {}

    # -- the client ----------------------------------------------------------------

    def _client(self, creds: Creds) -> Any:
        with self._lock:
            client = self._clients.get(creds)
        if client is not None:
            return client
        import botocore.session

        spec = self.spec
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},  # the coordinator retries
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=spec.connect_timeout, read_timeout=spec.read_timeout,
            proxies=spec.proxies, proxies_config=spec.proxies_config,
            client_cert=spec.client_cert,
            s3={**spec.s3_options, "payload_signing_enabled": False},
        )
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=spec.endpoint_url, region_name=spec.region, config=config,
            verify=spec.verify, aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key, aws_session_token=creds.token)
        if spec.direct:
            hook = sync_hook(self.sender)
            for op in ("PutObject", "UploadPart"):
                client.meta.events.register_first(f"before-send.s3.{op}", hook)
        with self._lock:
            if len(self._clients) > 4:  # credentials rotate; keep the newest few
                self._clients.clear()
            client = self._clients.setdefault(creds, client)
        return client

    # -- one request -----------------------------------------------------------------

    def run(self, job: PartJob) -> Outcome:
        """Read, hash and send ``job``; never raises (the outcome carries the error)."""
        checksum: str | None = None
        body: PartBody | None = None
        self.sender.bind(job.job_id)
        try:
            if self.sender.cancelled(job.job_id):  # given up on before it started
                raise Cancelled(f"request {job.job_id} was cancelled")
            if job.upload_id is None:
                digest = hashlib.sha256()
                body = read_part(job.path, job.offset, job.length, digest, self._pool)
                checksum = body.checksum
                self._same_bytes(job, checksum)
                resp = self._client(job.creds).put_object(
                    Bucket=job.bucket, Key=job.key, Body=body, ContentLength=job.length,
                    ChecksumAlgorithm="CRC32", ChecksumCRC32=checksum)
                return Outcome(etag=resp.get("ETag"), checksum=checksum,
                               digest=digest.hexdigest())
            body = self._read_in_order(job)
            checksum = body.checksum
            resp = self._client(job.creds).upload_part(
                Bucket=job.bucket, Key=job.key, UploadId=job.upload_id,
                PartNumber=job.part_number, Body=body, ContentLength=job.length,
                ChecksumCRC32=checksum)
            return Outcome(etag=resp["ETag"], checksum=checksum)
        except BaseException as e:  # handed to the coordinator, which raises it
            return Outcome(checksum=checksum, error=_portable(e))
        finally:
            if body is not None:
                body.release()
            self.sender.bind(None)
            self.sender.forget(job.job_id)

    def _same_bytes(self, job: PartJob, checksum: str) -> None:
        if job.expect is not None and checksum != job.expect:
            raise EOFError(f"{job.path}: bytes {job.offset}..{job.offset + job.length} "
                           "changed between two attempts to upload them: was the file "
                           "rewritten while being uploaded?")

    def _read_in_order(self, job: PartJob) -> PartBody:
        if job.expect is not None or not job.file_id:  # a retry, or no running digest
            body = read_part(job.path, job.offset, job.length, _NoDigest, self._pool)
            try:
                self._same_bytes(job, body.checksum)
            except BaseException:
                body.release()
                raise
            return body
        with self._lock:
            f = self._files.setdefault(job.file_id, _File())
        try:
            body = read_part(job.path, job.offset, job.length, _NoDigest, self._pool)
        except BaseException as e:
            with self._order:
                f.failed = f"part {job.part_number} could not be read: {e}"
                self._order.notify_all()
            raise
        try:
            with self._order:
                # Parts are read in parallel but hashed in order: part n waits for n - 1.
                # The coordinator starts parts in order and each holds a thread, so n - 1
                # is running; if it is cancelled instead, so is the file, and this one too.
                self._order.wait_for(lambda: f.next == job.part_number
                                     or f.failed is not None
                                     or self.sender.cancelled(job.job_id))
                if f.failed is not None:
                    raise Cancelled(f.failed)
                if f.next != job.part_number:
                    raise Cancelled(f"request {job.job_id} was cancelled")
        except BaseException:
            body.release()
            raise
        f.digest.update(body.view)  # outside the lock: releases the GIL on large buffers
        with self._order:
            f.next += 1
            self._order.notify_all()
        return body

    # -- per file, per job -------------------------------------------------------------

    def file_digest(self, file_id: int) -> str:
        """The whole-file SHA-256 once every part of ``file_id`` was read; forgets it."""
        with self._lock:
            f = self._files.pop(file_id)
        return f.digest.hexdigest()

    def drop_file(self, file_id: int) -> None:
        """Forget ``file_id``; parts of it still waiting for their turn give up."""
        with self._order:
            f = self._files.pop(file_id, None)
            if f is not None:
                f.failed = "the upload of this file was stopped"
                self._order.notify_all()

    def cancel(self, job_id: int) -> None:
        """Give up on ``job_id``: if it has not started it will not; if it waits for its turn
        to be hashed it stops waiting; if it is sending, its connection is cut so a send
        blocked on a stalled server returns now."""
        self.sender.cancel(job_id)
        with self._order:
            self._order.notify_all()

    def close(self) -> None:
        self.sender.close()


class _NoDigestType:
    @staticmethod
    def update(data: Any) -> None:
        pass


_NoDigest = _NoDigestType()


def _portable(e: BaseException) -> BaseException:
    """``e`` in a form that pickles and keeps what the retry predicate looks at."""
    if isinstance(e, ClientError):
        # Modelled subclasses (client.exceptions.NoSuchUpload) do not pickle.
        portable: BaseException = ClientError(dict(e.response), str(e.operation_name))
        return portable
    if isinstance(e, (BotoCoreError, OSError, EOFError, Cancelled)):
        return e
    return RuntimeError(f"{type(e).__name__}: {e}")
