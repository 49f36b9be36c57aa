"""Which S3 errors a retry may cure, and what to tell the user about the rest."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from ...errors import CheckpointError, StorageAccessError, UploadError
from ..plane.jobs import WorkerGone

__all__ = ["NOT_FOUND", "TRANSIENT_CODES", "error_code", "explain", "is_storage_error",
           "is_transient"]

_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequestsException",
})
NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_CREDENTIALS_ADVICE = ("check the AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                       "or AWS_PROFILE) and, for an S3-compatible server, "
                       "METAFLOW_S3_ENDPOINT_URL")


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _bad_certificate(exc: BaseException) -> bool:
    # botocore's SSLError carries the ssl module's (or aiohttp's) message.
    return isinstance(exc, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc)


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry of the same request may cure: throttling, 5xx, dropped
    connections, timeouts. False for refusals (4xx) and for programming errors."""
    if isinstance(exc, ClientError):
        return error_code(exc) in TRANSIENT_CODES or _status(exc) in _TRANSIENT_STATUS
    if isinstance(exc, SSLError):
        # A certificate that fails verification stays failed; a TLS handshake cut short does not.
        return not _bad_certificate(exc)
    if isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, WorkerGone)):
        return True
    if isinstance(exc, aiohttp.ClientError):
        return not isinstance(exc, (aiohttp.InvalidURL, ssl.SSLCertVerificationError,
                                    aiohttp.ClientResponseError))
    # ConnectionError covers reset, refused and broken pipe.
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError))


def is_storage_error(exc: BaseException) -> bool:
    # Errors from talking to the store; anything else (a local file shrinking, a bug)
    # propagates as it is, so the engine can tell a torn file from a failed upload.
    return isinstance(exc, (BotoCoreError, ClientError, aiohttp.ClientError, TimeoutError,
                            asyncio.TimeoutError, ConnectionError, WorkerGone))




def explain(exc: BaseException, *, bucket: str, key: str, where: str, doing: str,
            permission: str, writing: bool) -> CheckpointError:
    """A readable error for a request on ``key`` (at ``where``) that failed for good."""
    if isinstance(exc, NoCredentialsError):
        return StorageAccessError(
            f"{doing} {where}: no AWS credentials were found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with an instance role.", key=key)
    code = error_code(exc) if isinstance(exc, ClientError) else ""
    advice = {
        "AccessDenied": f"check that the IAM policy and the bucket policy allow "
                        f"{permission} on this key",
        "AllAccessDisabled": "access to this bucket has been disabled by its owner",
        "NoSuchBucket": f"the bucket {bucket!r} does not exist; check that "
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
    if _bad_certificate(exc):
        return StorageAccessError(
            f"{doing} {where} failed: the server's TLS certificate could not be verified "
            f"({exc}). If the store uses a private certificate authority, point AWS_CA_BUNDLE "
            "(or ca_bundle in the AWS config, or METAFLOW_S3_VERIFY_CERTIFICATE) at its CA "
            "bundle in PEM form.", key=key)
    last = f"{type(exc).__name__}: {exc}"
    msg = (f"{doing} {where} failed after retrying: {last}" if is_transient(exc)
           else f"{doing} {where} failed: {last}")
    return UploadError(msg, key=key) if writing else CheckpointError(msg)
