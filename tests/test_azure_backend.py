"""What only the Azure backend has, against Azurite: block blobs with per-block MD5, the
blob's own Content-MD5, uncommitted blocks found and cleaned up, its retries and errors.
The contract every backend keeps is in test_backend_contract.py."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import metaflow  # noqa: F401  Metaflow loads the extension before its modules are imported
import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from metaflow_extensions.asynccheckpoint.plugins.shared.azure_storage import split_azure_root
from metaflow_extensions.asynccheckpoint.plugins.shared.exceptions import CheckpointConfigException
from uploader import Engine, RetentionPolicy, Scope
from uploader.backends import TransferContext
from uploader.backends.azure.backend import UNCOMMITTED, AzureBackend, block_size_for
from uploader.backends.azure.errors import is_transient
from uploader.backends.plane.planes import ProcessPlane, ThreadPlane
from uploader.catalog import Catalog
from uploader.config import MiB, Settings, UploaderMode
from uploader.errors import StorageAccessError, UploadError
from uploader.retention import prune
from uploader.retry import RetryPolicy

pytestmark = pytest.mark.azure
T = TypeVar("T")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CountingPolicy(RetryPolicy):
    attempts: list[int] = dataclasses.field(default_factory=list)

    async def call(self, fn: Callable[[], Awaitable[T]], *,
                   is_transient: Callable[[BaseException], bool]) -> T:
        async def counted() -> T:
            self.attempts.append(1)
            return await fn()

        return await super().call(counted, is_transient=is_transient)


def make_ctx(policy: RetryPolicy | None = None,
             uploader: UploaderMode = UploaderMode.THREAD) -> TransferContext:
    return TransferContext(
        settings=Settings(part_size=5 * MiB, multipart_threshold=5 * MiB, upload_concurrency=4,
                          uploader=uploader),
        limiter=anyio.CapacityLimiter(4),
        retry=policy or RetryPolicy(max_attempts=3, deadline=30, initial_backoff=0.01),
        log=lambda _: None)


@contextlib.asynccontextmanager
async def opened(azure: Any, policy: RetryPolicy | None = None, *,
                 uploader: UploaderMode = UploaderMode.THREAD, **kw: Any
                 ) -> AsyncIterator[AzureBackend]:
    args = {"account_url": azure.azurite.account_url, "container": azure.container,
            "prefix": "metaflow", "credential": azure.azurite.credential(),
            "verify": azure.azurite.ca_bundle, **kw}
    b = AzureBackend(make_ctx(policy, uploader), **args)
    try:
        yield b
    finally:
        await b.aclose()


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


class BlobSpy:
    """Wraps the backend's data plane (in threads): records (and can fail) Put Blocks."""

    def __init__(self, backend: AzureBackend,
                 fail: Callable[[str, int], BaseException | None] = lambda b, n: None
                 ) -> None:
        self.calls: list[tuple[str, bytes, bytes]] = []  # (block id, body, Content-MD5)
        self._fail = fail
        self._backend = backend

    async def install(self) -> None:
        await self._backend._get_client()
        plane = self._backend._plane
        assert isinstance(plane, ThreadPlane)  # the tests' settings: in this process
        data_plane = plane.plane
        real = data_plane._send  # type: ignore[attr-defined]

        def send(name: str, block_id: str, body: memoryview, md5: bytes) -> None:
            self.calls.append((block_id, bytes(body), md5))
            exc = self._fail(block_id, sum(c[0] == block_id for c in self.calls))
            if exc is not None:
                raise exc
            real(name, block_id, body, md5)

        data_plane._send = send  # type: ignore[attr-defined]


# -- without a server ------------------------------------------------------------------


def test_block_size_keeps_within_azure_limits() -> None:
    assert block_size_for(10 * MiB, 16 * MiB) == 16 * MiB
    big = 50_000 * 16 * MiB + 1
    assert block_size_for(big, 16 * MiB) == 17 * MiB
    assert -(-big // block_size_for(big, 16 * MiB)) <= 50_000


@pytest.mark.parametrize("exc, transient", [
    (ServiceRequestError("connection refused"), True),
    (ServiceResponseError("connection reset"), True),
    (ClientAuthenticationError("no token"), False),
    (ConnectionResetError(), True),
    (TimeoutError(), True),
    (ValueError("bug"), False),
])
def test_is_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_http_errors_are_transient_by_status_and_code() -> None:
    def err(status: int, code: str) -> HttpResponseError:
        e = HttpResponseError(message=code)
        e.status_code, e.error_code = status, code  # type: ignore[attr-defined]
        return e

    assert is_transient(err(503, "ServerBusy"))
    assert is_transient(err(500, "InternalError"))
    assert is_transient(err(400, "Md5Mismatch"))  # the body changed on the way: send again
    assert not is_transient(err(403, "AuthorizationPermissionMismatch"))
    assert not is_transient(err(404, "ContainerNotFound"))


@pytest.mark.parametrize("root, expected", [
    ("bucket/metaflow", ("bucket", "metaflow")),
    ("az://bucket/a/b", ("bucket", "a/b")),
    ("bucket", ("bucket", "")),
])
def test_datastore_roots(root: str, expected: tuple[str, str]) -> None:
    assert split_azure_root(root) == expected


@pytest.mark.parametrize("root", ["/bucket/x", "bucket/x/", "bucket//x", ""])
def test_bad_datastore_roots_name_the_setting(root: str) -> None:
    with pytest.raises(CheckpointConfigException, match="METAFLOW_DATASTORE_SYSROOT_AZURE"):
        split_azure_root(root)


# -- against Azurite ------------------------------------------------------------------


@pytest.mark.anyio
async def test_blocks_carry_their_md5_and_the_blob_keeps_the_whole_files(
        azure: Any, tmp_path: Path) -> None:
    size = 12 * MiB + 3  # three blocks of 5 MiB, the last one short
    data = write_random(tmp_path / "f", size)
    async with opened(azure) as b:
        spy = BlobSpy(b)
        await spy.install()
        await b.put_file("ck/f", str(tmp_path / "f"), size)
    assert [len(body) for _, body, _ in sorted(spy.calls)] == [5 * MiB, 5 * MiB, 2 * MiB + 3]
    assert all(hashlib.md5(body).digest() == md5 for _, body, md5 in spy.calls)
    blob = azure.client().get_blob_client("metaflow/ck/f")
    committed, uncommitted = blob.get_block_list("all")
    assert [bl.size for bl in committed] == [5 * MiB, 5 * MiB, 2 * MiB + 3] and not uncommitted
    props = blob.get_blob_properties()
    assert bytes(props.content_settings.content_md5) == hashlib.md5(data).digest()


@pytest.mark.anyio
async def test_a_small_file_is_one_put_with_its_md5(azure: Any, tmp_path: Path) -> None:
    data = write_random(tmp_path / "f", 1000)
    async with opened(azure) as b:
        await b.put_file("ck/f", str(tmp_path / "f"), 1000)
        await b.put_bytes("ck/m.json", b"{}")
    c = azure.client()
    for name, body in (("metaflow/ck/f", data), ("metaflow/ck/m.json", b"{}")):
        blob = c.get_blob_client(name)
        assert blob.get_block_list("all") == ([], [])  # one Put Blob: no staged blocks
        md5 = blob.get_blob_properties().content_settings.content_md5
        assert bytes(md5) == hashlib.md5(body).digest()


@pytest.mark.anyio
async def test_the_service_refuses_a_body_that_does_not_match_its_md5(azure: Any) -> None:
    """What makes the per-block MD5 worth sending: the emulator checks it, as Azure does."""
    blob = azure.client().get_blob_client("metaflow/x")
    with pytest.raises(HttpResponseError, match=r"(?i)md5"):
        blob.stage_block("block-000000", b"abc",
                         headers={"Content-MD5": base64.b64encode(
                             hashlib.md5(b"abd").digest()).decode()})


@pytest.mark.anyio
async def test_a_transient_block_failure_resends_only_that_block(azure: Any,
                                                                 tmp_path: Path) -> None:
    size = 12 * MiB
    data = write_random(tmp_path / "f", size)
    async with opened(azure) as b:
        spy = BlobSpy(b, fail=lambda block, n: ServiceResponseError("connection reset")
                      if (block, n) == ("block-000001", 1) else None)
        await spy.install()
        assert await b.put_file("ck/f", str(tmp_path / "f"), size) == \
            hashlib.sha256(data).hexdigest()
    assert sorted(block_id for block_id, _, _ in spy.calls) == [
        "block-000000", "block-000001", "block-000001", "block-000002"]
    stored = azure.client().get_blob_client("metaflow/ck/f").download_blob().readall()
    assert stored == data


@pytest.mark.anyio
async def test_a_failed_upload_leaves_no_staged_blocks(azure: Any, tmp_path: Path) -> None:
    write_random(tmp_path / "f", 12 * MiB)
    refused = HttpResponseError(message="refused")
    async with opened(azure) as b:
        spy = BlobSpy(b, fail=lambda block, n: refused if block == "block-000002" else None)
        await spy.install()
        with pytest.raises(UploadError, match="ck/f"):
            await b.put_file("ck/f", str(tmp_path / "f"), 12 * MiB)
        assert await b.list_uploads("") == []
    names = [x.name for x in azure.client().list_blobs(include=["uncommittedblobs"])]
    assert names == []


@pytest.mark.anyio
async def test_uncommitted_blocks_are_listed_and_aborted(azure: Any) -> None:
    c = azure.client()
    c.get_blob_client("metaflow/s/data/1/ck/f").stage_block("block-000000", b"x" * 100)
    c.get_blob_client("metaflow/s/data/1/ck/done").upload_blob(b"y")
    c.get_blob_client("elsewhere/f").stage_block("block-000000", b"z")
    async with opened(azure) as b:
        (found,) = await b.list_uploads("s/")
        assert (found.key, found.upload_id) == ("s/data/1/ck/f", UNCOMMITTED)
        assert abs(found.initiated - time.time()) < 120
        assert await b.list_keys("s/") == ["s/data/1/ck/done"]  # not a key: never committed
        await b.abort_upload("s/data/1/ck/done", UNCOMMITTED)  # committed: left alone
        await b.abort_upload(found.key, found.upload_id)
        await b.abort_upload(found.key, found.upload_id)  # already gone: fine
        assert await b.list_uploads("") == []
        assert await b.get_bytes("s/data/1/ck/done") == b"y"
    assert [x.name for x in c.list_blobs(include=["uncommittedblobs"])] == [
        "elsewhere/f", "metaflow/s/data/1/ck/done"]


def test_retention_cleans_up_blocks_a_killed_writer_staged(azure: Any,
                                                           tmp_path: Path) -> None:
    scope = Scope("TrainFlow", "user:me", "train")
    azure.client().get_blob_client(f"metaflow/{scope.prefix}/data/9/dead/model.bin") \
        .stage_block("block-000000", b"x" * 1000)
    engine = Engine(azure.backend, Settings(uploader=UploaderMode.THREAD),
                    snapshot_dir=str(tmp_path / "snap"), log=lambda _: None)
    try:
        report = prune(Catalog(engine), scope.prefix, RetentionPolicy(keep_last=1),
                       grace_s=0, now=time.time() + 60)
    finally:
        engine.close()
    assert report.uploads_aborted == 1 and not report.errors
    assert list(azure.client().list_blobs(include=["uncommittedblobs"])) == []


@pytest.mark.anyio
async def test_missing_container_fails_at_once_and_names_the_setting(
        azure: Any, tmp_path: Path) -> None:
    write_random(tmp_path / "f", 1000)
    policy = CountingPolicy(max_attempts=5, deadline=30, initial_backoff=0.01)
    async with opened(azure, policy, container="no-such-container") as b:
        with pytest.raises(StorageAccessError) as info:
            await b.put_file("ck/f", str(tmp_path / "f"), 1000)
        assert policy.attempts == [1]
        msg = str(info.value)
        assert "no-such-container" in msg and "ck/f" in msg
        assert "METAFLOW_DATASTORE_SYSROOT_AZURE" in msg and info.value.key == "ck/f"
        with pytest.raises(StorageAccessError, match="no-such-container"):
            await b.delete_keys(["a", "b"])


@pytest.mark.anyio
async def test_a_wrong_key_says_what_to_check(azure: Any) -> None:
    wrong = AzureNamedKeyCredential("devstoreaccount1",
                                    base64.b64encode(b"not the key").decode())
    policy = CountingPolicy(max_attempts=5, deadline=30, initial_backoff=0.01)
    async with opened(azure, policy, credential=wrong) as b:
        with pytest.raises(StorageAccessError, match="METAFLOW_AZURE_STORAGE_BLOB_SERVICE"):
            await b.put_bytes("k", b"x")
    assert policy.attempts == [1]


@pytest.mark.anyio
async def test_exhausted_retries_name_container_and_key(azure: Any) -> None:
    policy = CountingPolicy(max_attempts=3, deadline=30, initial_backoff=0.001)
    async with opened(azure, policy) as b:
        client = await b._get_client()

        def get_blob_client(name: str) -> Any:
            class Busy:
                async def upload_blob(self, *a: Any, **kw: Any) -> None:
                    e = HttpResponseError(message="busy")
                    e.status_code, e.error_code = 503, "ServerBusy"  # type: ignore[attr-defined]
                    raise e
            return Busy()

        client.get_blob_client = get_blob_client  # type: ignore[method-assign]
        with pytest.raises(UploadError, match=f"{azure.container}.*ck/m.*ServerBusy") as info:
            await b.put_bytes("ck/m", b"{}")
    assert not isinstance(info.value, StorageAccessError)
    assert policy.attempts == [1, 1, 1]


def test_the_factory_needs_the_blob_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from metaflow import metaflow_config

    from metaflow_extensions.asynccheckpoint.plugins.shared.storage import backend_factory

    monkeypatch.setattr(metaflow_config, "AZURE_STORAGE_BLOB_SERVICE_ENDPOINT", None)
    with pytest.raises(CheckpointConfigException,
                       match="METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT"):
        backend_factory("azure", "container/metaflow")


def test_a_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from metaflow import metaflow_config

    from metaflow_extensions.asynccheckpoint.plugins.shared.storage import backend_factory

    monkeypatch.setattr(metaflow_config, "AZURE_STORAGE_BLOB_SERVICE_ENDPOINT",
                        "https://account.blob.core.windows.net/")
    monkeypatch.setitem(sys.modules, "azure.storage.blob.aio", None)  # as if not installed
    with pytest.raises(CheckpointConfigException,
                       match=r"pip install 'metaflow-async-checkpoint\[azure\]'"):
        backend_factory("azure", "container/metaflow")


def test_an_unknown_datastore_lists_the_supported_ones() -> None:
    from metaflow_extensions.asynccheckpoint.plugins.shared.storage import backend_factory

    with pytest.raises(CheckpointConfigException, match="--datastore=azure"):
        backend_factory("gopher", "x")


class AsyncTokens:
    """An asyncio-only token credential: blocks then go out through the asyncio client."""

    async def get_token(self, *scopes: str, **kw: Any) -> Any:
        from azure.core.credentials import AccessToken
        from azurite import fake_token

        token, expires = fake_token()
        return AccessToken(token, expires)

    async def close(self) -> None:
        return None


class SyncTokens:
    """A synchronous token credential, as Metaflow's Azure client providers make."""

    def __init__(self) -> None:
        self.asked = 0

    def get_token(self, *scopes: str, **kw: Any) -> Any:
        from azure.core.credentials import AccessToken
        from azurite import fake_token

        self.asked += 1
        token, expires = fake_token()
        return AccessToken(token, expires)


@pytest.mark.anyio
@pytest.mark.parametrize("uploader", [UploaderMode.THREAD, UploaderMode.PROCESS])
@pytest.mark.parametrize("tokens", [AsyncTokens, SyncTokens])
async def test_token_credentials_of_either_kind(azure: Any, tmp_path: Path,
                                                tokens: type[Any],
                                                uploader: UploaderMode) -> None:
    """A token credential does not pickle: the data plane, wherever it runs, sends each
    block with a bearer token the backend asked the credential for."""
    size = 12 * MiB
    data = write_random(tmp_path / "f", size)
    credential = tokens()
    async with opened(azure, credential=credential, uploader=uploader) as b:
        assert await b.put_file("ck/f", str(tmp_path / "f"), size) == \
            hashlib.sha256(data).hexdigest()
        plane = b._plane
        assert isinstance(plane, ProcessPlane if uploader is UploaderMode.PROCESS
                          else ThreadPlane)
        if isinstance(plane, ProcessPlane):
            assert plane.worker is not None and plane.deaths == 0
        assert await b.get_file("ck/f", str(tmp_path / "g"), size) == \
            hashlib.sha256(data).hexdigest()
    if isinstance(credential, SyncTokens):
        assert credential.asked >= 1
