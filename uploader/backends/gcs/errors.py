"""Which Google Cloud Storage errors a retry may cure, and what to tell the user about the rest.

Every request the GCS backend makes goes through aiohttp, so a refusal is an
``aiohttp.ClientResponseError`` carrying the HTTP status (and Google's JSON error as its
message), and a dropped connection is one of aiohttp's connection errors.
"""

from __future__ import annotations

import asyncio
import ssl

import aiohttp

from ...errors import CheckpointError, StorageAccessError, UploadError

__all__ = ["CREDENTIALS_ADVICE", "Mismatch", "SessionLost", "explain", "is_storage_error",
           "is_transient", "status_of"]

# GCS's retry guidance: 408, 429 and 5xx are worth another attempt; other 4xx are not.
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CREDENTIALS_ADVICE = (
    "check the Google credentials Metaflow uses (GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth "
    "application-default login`, or the machine's service account) and that they are granted "
    "roles/storage.objectUser (or storage.objects.create, get, list and delete) on the bucket")


class SessionLost(Exception):
    """Raised by the GCS backend when a resumable upload session cannot go on: the service
    forgot it (404/410), or it finished with other bytes than were sent. Transient: the
    file is sent again in a new session."""


class Mismatch(Exception):
    """Raised by the GCS backend where bytes arrived otherwise than they were sent: an
    object stored with another size or CRC32C than the upload's, or a download whose bytes
    do not match the CRC32C GCS sent with them. Transient: the request is made again."""


def status_of(exc: BaseException) -> int:
    return exc.status if isinstance(exc, aiohttp.ClientResponseError) else 0


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry of the same request may cure: throttling (429), 408 and 5xx,
    dropped connections, timeouts, a lost upload session. False for refusals (other 4xx),
    certificates that fail verification, and programming errors."""
    if isinstance(exc, (SessionLost, Mismatch)):
        return True
    if isinstance(exc, aiohttp.ClientResponseError):
        return exc.status in _TRANSIENT_STATUS
    if isinstance(exc, aiohttp.ClientError):
        return not isinstance(exc, (aiohttp.InvalidURL, aiohttp.ClientConnectorCertificateError,
                                    ssl.SSLCertVerificationError))
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError))


def is_storage_error(exc: BaseException) -> bool:
    # Errors from talking to the store; anything else (a local file shrinking, a bug)
    # propagates as it is, so the engine can tell a torn file from a failed upload.
    if type(exc).__module__.startswith("google.auth"):
        return True  # credentials that cannot be found or refreshed
    return isinstance(exc, (aiohttp.ClientError, TimeoutError, asyncio.TimeoutError,
                            ConnectionError, SessionLost, Mismatch))


def explain(exc: BaseException, *, bucket: str, key: str, where: str, doing: str,
            permission: str, writing: bool) -> CheckpointError:
    """A readable error for a request on ``key`` (at ``where``) that failed for good."""
    name = type(exc).__name__
    if type(exc).__module__.startswith("google.auth"):
        return StorageAccessError(
            f"{doing} {where}: Google credentials could not be had ({name}: {exc}); "
            f"{CREDENTIALS_ADVICE}.", key=key)
    status = status_of(exc)
    detail = exc.message if isinstance(exc, aiohttp.ClientResponseError) else str(exc)
    if status in (401, 403):
        return StorageAccessError(
            f"{doing} {where} was refused (HTTP {status}: {detail}): {CREDENTIALS_ADVICE}, "
            f"including {permission}.", key=key)
    if status == 404 and writing:
        return StorageAccessError(
            f"{doing} {where} failed (HTTP 404): the bucket {bucket!r} does not exist; check "
            "that METAFLOW_DATASTORE_SYSROOT_GS names an existing bucket.", key=key)
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, ssl.SSLCertVerificationError)):
        return StorageAccessError(
            f"{doing} {where} failed: the server's TLS certificate could not be verified "
            f"({exc}).", key=key)
    last = f"HTTP {status}: {detail}" if status else f"{name}: {exc}"
    msg = (f"{doing} {where} failed after retrying: {last}" if is_transient(exc)
           else f"{doing} {where} failed: {last}")
    return UploadError(msg, key=key) if writing else CheckpointError(msg)
