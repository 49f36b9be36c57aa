"""Which Azure Blob Storage errors a retry may cure, and what to tell the user about the rest."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    IncompleteReadError,
    ServiceRequestError,
    ServiceResponseError,
)

from ...errors import CheckpointError, StorageAccessError, UploadError
from ..plane.jobs import WorkerGone  # the upload worker process is shared with S3

__all__ = ["NOT_FOUND", "error_code", "explain", "is_storage_error", "is_transient"]

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({
    "ServerBusy", "OperationTimedOut", "InternalError",
    # A block whose bytes arrived changed: the service refused it; sending it again may not.
    "Md5Mismatch", "Crc64Mismatch",
})
NOT_FOUND = frozenset({"BlobNotFound", "ResourceNotFound"})
_CREDENTIALS_ADVICE = (
    "check the Azure credentials Metaflow uses (METAFLOW_DEFAULT_AZURE_CLIENT_PROVIDER, by "
    "default azure.identity's DefaultAzureCredential: `az login`, AZURE_CLIENT_ID / "
    "AZURE_TENANT_ID / AZURE_CLIENT_SECRET, or a managed identity) and "
    "METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT")


def error_code(exc: BaseException) -> str:
    if not isinstance(exc, HttpResponseError):
        return ""
    code = getattr(exc, "error_code", None)  # set by the storage SDK's error handling
    return str(getattr(code, "value", code) or "")


def _status(exc: BaseException) -> int:
    return int(getattr(exc, "status_code", 0) or 0) if isinstance(exc, HttpResponseError) else 0


def _bad_certificate(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or \
                "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry of the same request may cure: throttling, 5xx, dropped
    connections, timeouts. False for refusals (4xx) and for programming errors."""
    if isinstance(exc, ClientAuthenticationError):
        return False
    if isinstance(exc, (IncompleteReadError, WorkerGone)):
        return True
    if isinstance(exc, HttpResponseError):
        return error_code(exc) in _TRANSIENT_CODES or _status(exc) in _TRANSIENT_STATUS
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return not _bad_certificate(exc)
    if isinstance(exc, aiohttp.ClientError):
        return not isinstance(exc, (aiohttp.InvalidURL, ssl.SSLCertVerificationError,
                                    aiohttp.ClientResponseError))
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError))


def is_storage_error(exc: BaseException) -> bool:
    # Errors from talking to the store; anything else (a local file shrinking, a bug)
    # propagates as it is, so the engine can tell a torn file from a failed upload.
    return isinstance(exc, (AzureError, aiohttp.ClientError, TimeoutError,
                            asyncio.TimeoutError, ConnectionError, WorkerGone))


def explain(exc: BaseException, *, container: str, key: str, where: str, doing: str,
            writing: bool) -> CheckpointError:
    """A readable error for a request on ``key`` (at ``where``) that failed for good."""
    code = error_code(exc)
    if isinstance(exc, ClientAuthenticationError) and not code:
        # No token at all: the credential chain found nothing to sign in with.
        return StorageAccessError(
            f"{doing} {where}: no Azure credential could be had ({exc}); "
            f"{_CREDENTIALS_ADVICE}.", key=key)
    advice = {
        "ContainerNotFound": f"the container {container!r} does not exist; check that "
                             "METAFLOW_DATASTORE_SYSROOT_AZURE names an existing container",
        "AuthorizationFailure": "the identity may not use this storage account; give it the "
                                "'Storage Blob Data Contributor' role on the container",
        "AuthorizationPermissionMismatch": "the identity lacks a permission on this "
                                           "container; give it the 'Storage Blob Data "
                                           "Contributor' role",
        "AuthenticationFailed": _CREDENTIALS_ADVICE,
        "InvalidAuthenticationInfo": _CREDENTIALS_ADVICE,
        "AccountIsDisabled": "the storage account is disabled; ask its owner",
        "InsufficientAccountPermissions": "the identity lacks a permission on this account; "
                                          "give it the 'Storage Blob Data Contributor' role",
    }.get(code)
    if advice is None and _status(exc) == 403:
        code, advice = code or "403", _CREDENTIALS_ADVICE
    if advice:
        return StorageAccessError(f"{doing} {where} was refused ({code}): {advice}.", key=key)
    if _bad_certificate(exc):
        return StorageAccessError(
            f"{doing} {where} failed: the server's TLS certificate could not be verified "
            f"({exc}). If the endpoint uses a private certificate authority, point "
            "REQUESTS_CA_BUNDLE at its CA bundle in PEM form.", key=key)
    first = str(exc).splitlines()[0] if str(exc) else ""
    last = f"{type(exc).__name__}: {first}" + (f" ({code})" if code else "")
    msg = (f"{doing} {where} failed after retrying: {last}" if is_transient(exc)
           else f"{doing} {where} failed: {last}")
    return UploadError(msg, key=key) if writing else CheckpointError(msg)
