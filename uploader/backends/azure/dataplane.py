"""The data plane of an Azure block blob upload: read, hash and send one block or blob.

One :meth:`AzureDataPlane.run` call does the whole per-byte path of a Put Block in the
calling (worker) thread: read the block once into a pooled buffer, take its MD5 (sent as
``Content-MD5``, which the service checks), feed it in block order to the file's running
SHA-256 (what the manifest records) and MD5 (the blob's own Content-MD5, set at the
commit), and send it through the SDK's synchronous client (:mod:`.sender`). A file
below the block threshold is one job too: one Put Blob, with the file's digests.

It runs where the S3 data plane runs (:mod:`..plane.planes`): in worker threads of the
task's process, or in the spawned upload worker process (:mod:`..plane.worker`), so that a
block's bytes never cross the training loop's GIL. The coordinator (the Azure backend, on
the engine's event loop) keeps what is not per byte: which blocks to send, retries (a
retry reads the block again and must find the MD5 of the first read), the commit with
Put Block List, and the clean-up of a failed upload.

Everything crossing to the worker process is a plain picklable value. A shared key or a
SAS goes once, in the :class:`AzureSpec`. A token credential (azure-identity's, which
holds locks, HTTP sessions and caches, and does not pickle) stays in the task's process:
the coordinator asks it for a bearer token and each :class:`BlockJob` carries the token,
as an S3 part carries the credentials it is signed with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import threading
from collections.abc import Sequence
from typing import Any

from azure.core.credentials import AccessToken, AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import AzureError, HttpResponseError

from ..plane.jobs import Cancelled, Outcome
from ..plane.parts import BufferPool
from .blocks import Block, FileHashes, b64md5, read_block, read_whole
from .sender import BlockSender

__all__ = ["AzureDataPlane", "AzureSpec", "BlockJob", "digest_of_blocks", "join_digests",
           "portable_credential", "split_digests"]

_CHUNK = 4 * 1024 * 1024


def portable_credential(credential: Any) -> Any:
    """``credential`` if a worker process can be given it (a shared key, a SAS; None for
    anonymous access), else None: a token credential is asked for tokens here instead."""
    if credential is None or isinstance(credential, (str, AzureNamedKeyCredential,
                                                     AzureSasCredential)):
        return credential
    if isinstance(credential, dict) and set(credential) == {"account_name", "account_key"}:
        return dict(credential)
    return None


def join_digests(sha256_hex: str, md5: bytes) -> str:
    """A file's SHA-256 and MD5 as the one string a plane's ``file_digest`` returns."""
    return f"{sha256_hex}:{md5.hex()}"


def split_digests(joined: str) -> tuple[str, bytes]:
    sha256_hex, md5_hex = joined.split(":")
    return sha256_hex, bytes.fromhex(md5_hex)


def digest_of_blocks(path: str, blocks: Sequence[tuple[int, int, str]]) -> str:
    """The SHA-256 and MD5 (:func:`join_digests`) of ``path`` read back block by block,
    ``blocks`` being the ``(offset, length, base64 MD5)`` each block was sent with.

    For a file whose running digests were lost with an upload worker process. Each block
    must still have the MD5 it was sent with, so the digests are those of what was stored;
    raises EOFError (the file was rewritten: torn) where one does not.
    """
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    buf = memoryview(bytearray(_CHUNK))
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length, expected in blocks:
            block_md5, pos, end = hashlib.md5(), offset, offset + length
            while pos < end:
                n = os.preadv(fd, [buf[:min(_CHUNK, end - pos)]], pos)
                if n == 0:
                    raise EOFError(f"{path}: file ended at byte {pos}, expected {end} bytes: "
                                   "was it truncated while being uploaded?")
                for h in (sha256, md5, block_md5):
                    h.update(buf[:n])
                pos += n
            if b64md5(block_md5.digest()) != expected:
                raise EOFError(f"{path}: bytes {offset}..{end} changed after they were "
                               "uploaded: was the file rewritten while being uploaded?")
    finally:
        os.close(fd)
    return join_digests(sha256.hexdigest(), md5.digest())


@dataclasses.dataclass(frozen=True)
class AzureSpec:
    """How to reach the container; the same for every block of a backend."""

    account_url: str
    container: str
    verify: bool | str
    connections: int  # requests in flight at once: the connection pool's size
    credential: Any = None  # from portable_credential(); unused where ``bearer``
    bearer: bool = False  # each job carries a token from the task's token credential
    connect_timeout: float = 10
    read_timeout: float = 120

    def plane(self) -> AzureDataPlane:
        return AzureDataPlane(self)

    def digest_again(self, path: str, parts: Sequence[tuple[int, int, str]]) -> str:
        return digest_of_blocks(path, parts)


@dataclasses.dataclass(frozen=True)
class BlockJob:
    """One Put Block: block ``index`` of a file, ``length`` bytes at ``offset``; or, with
    ``block_id`` empty, one Put Blob of a whole file of ``length`` bytes."""

    job_id: int
    blob: str  # the blob's name, prefix included
    block_id: str
    path: str
    offset: int
    length: int
    index: int
    # Blocks of one file share running digests in the plane that runs them; 0 for none (a
    # file whose digests were lost with a worker process: the coordinator reads it again).
    file_id: int = 0
    expect: str | None = None  # the base64 MD5 an earlier attempt read: a retry must match
    token: tuple[str, int] | None = None  # (bearer token, expiry) where the spec says so

    @property
    def first_in_file(self) -> bool:
        """Whether this attempt feeds its file's running digests."""
        return bool(self.file_id) and self.expect is None


class _Tokens:
    """The token credential of a plane whose jobs carry their tokens: the newest one."""

    def __init__(self) -> None:
        self._token = AccessToken("", 0)

    def update(self, token: tuple[str, int]) -> None:
        if token[1] >= self._token.expires_on:
            self._token = AccessToken(*token)

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return self._token  # the coordinator hands a fresh one with every job


class _File:
    __slots__ = ("failed", "md5", "next", "sha256")

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5()
        self.next = 0  # the block whose bytes the digests take next
        self.failed: str | None = None


class AzureDataPlane:
    """Thread-safe; one per backend (per process, for a worker process)."""

    def __init__(self, spec: AzureSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._order = threading.Condition(self._lock)
        self._files: dict[int, _File] = {}
        self._cancelled: set[int] = set()
        self._pool = BufferPool()
        self._tokens = _Tokens()
        self._sender: BlockSender | None = None

    def _get_sender(self) -> BlockSender:
        with self._lock:
            if self._sender is None:
                spec = self.spec
                self._sender = BlockSender(
                    spec.account_url, spec.container,
                    credential=self._tokens if spec.bearer else spec.credential,
                    verify=spec.verify, connections=spec.connections)
            return self._sender

    def _send(self, blob: str, block_id: str, body: memoryview, md5: bytes) -> None:
        self._get_sender().stage(blob, block_id, body, md5)

    def run(self, job: BlockJob) -> Outcome:
        """Read, hash and send ``job``; never raises (the outcome carries the error)."""
        checksum: str | None = None
        block: Block | None = None
        try:
            with self._lock:
                if job.job_id in self._cancelled:  # given up on before it started
                    raise Cancelled(f"request {job.job_id} was cancelled")
            if job.token is not None:
                self._tokens.update(job.token)
            if not job.block_id:
                return self._put_whole(job)
            try:
                block = read_block(job.path, job.offset, job.length, self._pool)
            except BaseException as e:
                if job.first_in_file:  # later blocks of the file must not wait for this one
                    self._fail(job.file_id, f"block {job.index} could not be read: {e}")
                raise
            checksum = b64md5(block.md5)
            if job.expect is not None and checksum != job.expect:
                raise EOFError(f"{job.path}: bytes {job.offset}..{job.offset + job.length} "
                               "changed between two attempts to upload them: was the file "
                               "rewritten while being uploaded?")
            if job.first_in_file:
                self._feed(job, block)
            self._send(job.blob, job.block_id, block.view, block.md5)
            return Outcome(checksum=checksum)
        except BaseException as e:  # handed to the coordinator, which raises it
            return Outcome(checksum=checksum, error=_portable(e))
        finally:
            if block is not None:
                block.release()
            with self._lock:
                self._cancelled.discard(job.job_id)

    def _put_whole(self, job: BlockJob) -> Outcome:
        hashes = FileHashes()
        data = read_whole(job.path, job.length, hashes)
        md5 = hashes.md5.digest()
        checksum = b64md5(md5)
        if job.expect is not None and checksum != job.expect:
            raise EOFError(f"{job.path} changed between two attempts to upload it: was it "
                           "rewritten while being uploaded?")
        try:
            self._get_sender().put(job.blob, data, md5)
        except BaseException as e:
            return Outcome(checksum=checksum, error=_portable(e))
        return Outcome(checksum=checksum,
                       digest=join_digests(hashes.sha256.hexdigest(), md5))

    def _feed(self, job: BlockJob, block: Block) -> None:
        with self._order:
            f = self._files.setdefault(job.file_id, _File())
            # Blocks are read in parallel but hashed in order: block n waits for n - 1. The
            # coordinator starts blocks in order and each holds a thread, so n - 1 is
            # running; if it is cancelled instead, so is the file, and this one too.
            self._order.wait_for(lambda: f.next == job.index or f.failed is not None
                                 or job.job_id in self._cancelled)
            if f.failed is not None:
                raise Cancelled(f.failed)
            if f.next != job.index:
                f.failed = f"block {job.index} was cancelled"
                self._order.notify_all()
                raise Cancelled(f"request {job.job_id} was cancelled")
        f.sha256.update(block.view)  # outside the lock: both release the GIL
        f.md5.update(block.view)
        with self._order:
            f.next += 1
            self._order.notify_all()

    def _fail(self, file_id: int, why: str) -> None:
        with self._order:
            f = self._files.setdefault(file_id, _File())
            f.failed = f.failed or why
            self._order.notify_all()

    def file_digest(self, file_id: int) -> str:
        """The whole file's SHA-256 and MD5 (:func:`join_digests`) once every block of
        ``file_id`` was read; forgets them."""
        with self._lock:
            f = self._files.pop(file_id)
        return join_digests(f.sha256.hexdigest(), f.md5.digest())

    def drop_file(self, file_id: int) -> None:
        """Forget ``file_id``; blocks of it still waiting for their turn give up."""
        with self._order:
            f = self._files.pop(file_id, None)
            if f is not None:
                f.failed = "the upload of this file was stopped"
                self._order.notify_all()

    def cancel(self, job_id: int) -> None:
        """Give up on ``job_id``: if it has not started it will not; if it waits for its turn
        to be hashed it stops waiting. A send under way runs to its end (the synchronous
        client cannot be cut short), bounded by the client's timeouts."""
        with self._order:
            self._cancelled.add(job_id)
            self._order.notify_all()

    def close(self) -> None:
        with self._lock:
            sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()


def _portable(e: BaseException) -> BaseException:
    """``e`` in a form that pickles and keeps what the retry predicate and the error
    messages look at (the type, status, error code and message).

    An ``AzureError`` keeps the exception being handled when it was made (``exc_value``,
    with its traceback) and the SDK's transport error, whose request holds the block's
    buffer: neither crosses to the coordinator."""
    portable: BaseException
    if isinstance(e, HttpResponseError):
        http = type(e)(message=str(e))
        http.status_code = e.status_code
        http.error_code = getattr(e, "error_code", None)  # type: ignore[attr-defined]
        http.reason = e.reason
        portable = http
    elif isinstance(e, AzureError):
        try:
            portable = type(e)(str(e))
        except Exception:
            portable = RuntimeError(f"{type(e).__name__}: {e}")
    elif isinstance(e, (OSError, EOFError, Cancelled)):
        portable = e
    else:
        portable = RuntimeError(f"{type(e).__name__}: {e}")
    if isinstance(portable, AzureError):
        portable.exc_type = portable.exc_value = portable.exc_traceback = None
        portable.inner_exception = None
    try:
        pickle.dumps(portable)
    except Exception:  # a network library's OSError carrying its request, say
        if isinstance(e, OSError):
            return ConnectionError(f"{type(e).__name__}: {e}")
        return RuntimeError(f"{type(e).__name__}: {e}")
    return portable
