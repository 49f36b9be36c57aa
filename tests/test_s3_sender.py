"""The blocking sender behaves like the botocore client it serves: a reply that stalls or is
cut short is a retried error, never a partial success; TLS is verified as botocore would
verify it; and what the sender cannot do the botocore way goes through botocore.

Against a real moto server on loopback, faults injected by tests/faultproxy.py, TLS
terminated by the same proxy with a private CA.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import trustme
from botocore.config import Config
from botocore.exceptions import (
    ConnectionClosedError,
    IncompleteReadError,
    ReadTimeoutError,
)
from faultproxy import FaultProxy, PartialReply, cut, stall
from metaflow import metaflow_config
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, running_s3_server

from metaflow_extensions.asynccheckpoint.plugins.shared.exceptions import CheckpointConfigException
from metaflow_extensions.asynccheckpoint.plugins.shared.s3_storage import s3_backend_factory
from uploader.backends import S3Backend, TransferContext
from uploader.backends.s3.sender import BlockingSender, SignedGets
from uploader.config import MiB, Settings, UploaderMode
from uploader.engine import Engine, SaveRequest
from uploader.errors import StorageAccessError, UploadError
from uploader.layout import CheckpointKeys, Scope, new_checkpoint_id
from uploader.retry import RetryPolicy

pytestmark = pytest.mark.s3

T = TypeVar("T")
BUCKET = "sender-test"
PREFIX = "ckpt"
READ_TIMEOUT = 0.5  # seconds: what each stalled attempt costs
FAST = Config(read_timeout=READ_TIMEOUT, connect_timeout=5)
DATA = os.urandom(64 * 1024)
# What would send a client elsewhere than where a test points it.
_ROUTING_VARS = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy")


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with running_s3_server() as srv:
        yield srv


@pytest.fixture
def s3(server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    for name in _ROUTING_VARS:
        monkeypatch.delenv(name, raising=False)
    return server.fresh(BUCKET, monkeypatch, tmp_path)


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(s3.endpoint) as p:
        yield p


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_tls(ca: trustme.CA, *, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@pytest.fixture
def tls_proxy(s3: S3Server, ca: trustme.CA) -> Iterator[FaultProxy]:
    with FaultProxy(s3.endpoint, tls=server_tls(ca)) as p:
        yield p


@pytest.fixture(params=list(UploaderMode), ids=lambda m: m.value)
def mode(request: pytest.FixtureRequest) -> UploaderMode:
    return UploaderMode(request.param)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CountingPolicy(RetryPolicy):
    attempts: list[int] = dataclasses.field(default_factory=list)

    async def call(self, fn: Callable[[], Awaitable[T]], *,
                   is_transient: Callable[[BaseException], bool]) -> T:
        async def counted() -> T:
            self.attempts.append(1)
            return await fn()

        return await super().call(counted, is_transient=is_transient)


@contextlib.asynccontextmanager
async def backend(endpoint: str, *, mode: UploaderMode = UploaderMode.THREAD,
                  policy: RetryPolicy | None = None, **client_kwargs: Any
                  ) -> AsyncIterator[S3Backend]:
    ctx = TransferContext(
        settings=Settings(part_size=5 * MiB, multipart_threshold=5 * MiB, upload_concurrency=4,
                          uploader=mode),
        limiter=anyio.CapacityLimiter(4),
        retry=policy or RetryPolicy(max_attempts=3, deadline=30, initial_backoff=0.01))
    b = S3Backend(ctx, bucket=BUCKET, prefix=PREFIX, endpoint_url=endpoint,
                  client_kwargs={"config": FAST, **client_kwargs})
    try:
        yield b
    finally:
        await b.aclose()


def write_random(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def stored(s3: S3Server, key: str) -> bytes:
    return bytes(s3.client().get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read())


def finishes(fn: Callable[[], T]) -> T:
    """``fn()`` in a thread that must finish within 30 s: a sender that hangs on a stalled
    peer fails the test instead of hanging it (closing the proxy then frees the thread)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(fn).result(timeout=30)
    finally:
        pool.shutdown(wait=False)


def fault_id(fault: PartialReply) -> str:
    return f"{fault.kind}-{fault.at}"


# -- the sender on its own: errors botocore would raise, never a partial success -------


@pytest.fixture(params=["http", "https"])
def any_proxy(request: pytest.FixtureRequest, s3: S3Server, ca: trustme.CA,
              ca_file: str) -> Iterator[tuple[FaultProxy, bool | str]]:
    """A fault proxy in plain HTTP or terminating TLS, and the ``verify`` that trusts it."""
    tls = server_tls(ca) if request.param == "https" else None
    with FaultProxy(s3.endpoint, tls=tls) as p:
        yield p, ca_file if tls else True


def signed_gets(endpoint: str, verify: bool | str) -> SignedGets:
    return SignedGets(BlockingSender(verify=verify, read_timeout=READ_TIMEOUT),
                      base_url=f"{endpoint}/{BUCKET}/", region=REGION)


def get(gets: SignedGets) -> tuple[int, bytes]:
    return finishes(lambda: gets.get("k", ACCESS_KEY, SECRET_KEY, None))


@pytest.mark.parametrize("at", ["status", "headers", "body"])
def test_a_stalled_reply_raises_a_read_timeout(s3: S3Server, any_proxy: tuple[FaultProxy, Any],
                                               at: str) -> None:
    proxy, verify = any_proxy
    s3.client().put_object(Bucket=BUCKET, Key="k", Body=DATA)
    proxy.add_rule(stall(at), method="GET", times=1)
    gets = signed_gets(proxy.endpoint, verify)
    try:
        with pytest.raises(ReadTimeoutError, match="Read timeout on endpoint URL"):
            get(gets)
        assert get(gets) == (200, DATA)  # the proxy's next reply is whole
    finally:
        gets.sender.close()
    assert [r.action for r in proxy.requests] == ["stall", "forward"]


@pytest.mark.parametrize(("at", "raised"), [("status", ConnectionClosedError),
                                            ("headers", ConnectionClosedError),
                                            ("body", IncompleteReadError)])
def test_a_reply_cut_short_is_never_a_success(s3: S3Server, any_proxy: tuple[FaultProxy, Any],
                                              at: str, raised: type[Exception],
                                              tmp_path: Path) -> None:
    proxy, verify = any_proxy
    s3.client().put_object(Bucket=BUCKET, Key="k", Body=DATA)
    proxy.add_rule(cut(at), method="GET", times=2)
    gets = signed_gets(proxy.endpoint, verify)
    fd = os.open(tmp_path / "range", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(raised):
            get(gets)
        with pytest.raises(raised):  # a range received straight into the file's pages
            finishes(lambda: gets.get_into("k", ACCESS_KEY, SECRET_KEY, None, fd=fd, offset=0,
                                           length=len(DATA), feed=lambda _: None))
        assert get(gets) == (200, DATA)
    finally:
        os.close(fd)
        gets.sender.close()
    assert [r.action for r in proxy.requests] == ["cut", "cut", "forward"]


# -- the backend: stalls and cuts are retried, and what commits is whole ---------------

UPLOAD_FAULTS = [stall("status"), stall("headers"), cut("status"), cut("headers")]


@pytest.mark.anyio
@pytest.mark.parametrize("fault", UPLOAD_FAULTS, ids=fault_id)
async def test_a_stalled_or_cut_upload_is_retried(s3: S3Server, proxy: FaultProxy,
                                                  mode: UploaderMode, fault: PartialReply,
                                                  tmp_path: Path) -> None:
    """PutObject and UploadPart replies have no body: they stall or end in their head."""
    small, big = tmp_path / "small", tmp_path / "big"
    want_small, want_big = write_random(small, 100_000), write_random(big, 12 * MiB)
    proxy.add_rule(fault, method="PUT", path_regex="/small$", times=1)
    proxy.add_rule(fault, method="PUT", query_contains="partNumber=2", times=1)
    async with backend(proxy.endpoint, mode=mode) as b:
        assert await b.put_file("ck/small", str(small), 100_000) == want_small
        assert await b.put_file("ck/big", str(big), 12 * MiB) == want_big
    assert proxy.count(action=fault.kind) == 2
    assert proxy.count(method="PUT", path_regex="/small$") == 2
    assert proxy.count(method="PUT", query_contains="partNumber=2") == 2
    assert hashlib.sha256(stored(s3, "ck/small")).hexdigest() == want_small
    assert hashlib.sha256(stored(s3, "ck/big")).hexdigest() == want_big


READ_FAULTS = [stall("status"), stall("headers"), stall("body"), cut("headers"), cut("body")]


@pytest.mark.anyio
@pytest.mark.parametrize("fault", READ_FAULTS, ids=fault_id)
async def test_a_stalled_or_cut_read_returns_every_byte(s3: S3Server, proxy: FaultProxy,
                                                        fault: PartialReply,
                                                        tmp_path: Path) -> None:
    manifest = os.urandom(3000)
    s3.client().put_object(Bucket=BUCKET, Key=f"{PREFIX}/ck/m.json", Body=manifest)
    big = os.urandom(12 * MiB)
    s3.client().put_object(Bucket=BUCKET, Key=f"{PREFIX}/ck/big", Body=big)
    async with backend(proxy.endpoint) as b:
        proxy.add_rule(fault, method="GET", times=1)
        assert await b.get_bytes("ck/m.json") == manifest
        proxy.add_rule(fault, method="GET", times=1)
        dest = tmp_path / "out"
        assert await b.get_file("ck/big", str(dest), len(big)) == hashlib.sha256(big).hexdigest()
    assert dest.read_bytes() == big
    assert proxy.count(action=fault.kind) == 2


@pytest.mark.anyio
async def test_with_retries_spent_a_stall_fails_saying_read_timeout(
        s3: S3Server, proxy: FaultProxy, mode: UploaderMode, tmp_path: Path) -> None:
    src = tmp_path / "f"
    write_random(src, 1000)
    policy = CountingPolicy(max_attempts=2, deadline=30, initial_backoff=0.01)
    proxy.add_rule(stall("status"), method="PUT")
    async with backend(proxy.endpoint, mode=mode, policy=policy) as b:
        with pytest.raises(UploadError, match=r"ck/f.*failed after retrying: ReadTimeoutError: "
                                              r"Read timeout on endpoint URL") as info:
            await b.put_file("ck/f", str(src), 1000)
    assert not isinstance(info.value, StorageAccessError)
    assert policy.attempts == [1, 1]
    assert proxy.count(action="stall") == 2


def test_a_checkpoint_commits_through_stalls_and_cuts_and_loads_whole(
        s3: S3Server, proxy: FaultProxy, tmp_path: Path) -> None:
    """The engine as @checkpoint drives it (the worker process sending), through a stall or
    a cut of every kind; then loaded back through stalled and cut reads."""
    src = tmp_path / "staging"
    (src / "sub").mkdir(parents=True)
    want = {"state.pt": os.urandom(12 * MiB + 7), "sub/meta.json": b'{"epoch": 3}'}
    for rel, data in want.items():
        (src / rel).write_bytes(data)
    data_key = r"/data/.*"
    proxy.add_rule(stall("status"), method="PUT", path_regex=data_key + "meta.json$", times=1)
    proxy.add_rule(stall("headers"), method="PUT", query_contains="partNumber=1", times=1)
    proxy.add_rule(cut("status"), method="PUT", query_contains="partNumber=2", times=1)
    proxy.add_rule(cut("headers"), method="PUT", query_contains="partNumber=3", times=1)
    settings = Settings(part_size=5 * MiB, multipart_threshold=5 * MiB, upload_concurrency=4,
                        max_attempts=3, retry_deadline=30)
    engine = Engine(lambda ctx: S3Backend(ctx, bucket=BUCKET, prefix="metaflow",
                                          endpoint_url=proxy.endpoint,
                                          client_kwargs={"config": FAST}),
                    settings, snapshot_dir=str(tmp_path / "snapshots"), log=lambda _: None)
    try:
        scope = Scope("TrainFlow", "user:me", "train")
        keys = CheckpointKeys(scope.prefix, "42", new_checkpoint_id("7", 0))
        engine.save(SaveRequest(source=str(src), keys=keys, name="mfchckpt", latest=True,
                                metadata={}, identity={}, reference={})).wait(timeout=60)
        assert proxy.count(action="stall") == 2 and proxy.count(action="cut") == 2
        (found,) = engine.list_manifest_keys(scope.manifests_prefix())
        proxy.add_rule(stall("body"), method="GET", path_regex=r"/manifests/", times=1)
        manifest = engine.read_manifest(found)
        assert manifest is not None and len(manifest.files) == 2
        proxy.add_rule(stall("body"), method="GET", path_regex=data_key + "state.pt$", times=1)
        proxy.add_rule(cut("body"), method="GET", path_regex=data_key + "state.pt$", times=1)
        proxy.add_rule(cut("body"), method="GET", path_regex=data_key + "meta.json$", times=1)
        engine.load(manifest, str(tmp_path / "restored"))
        assert proxy.count(action="stall") == 4 and proxy.count(action="cut") == 4
    finally:
        engine.close()
    for rel, data in want.items():
        assert (tmp_path / "restored" / rel).read_bytes() == data


# -- TLS as botocore does it -------------------------------------------------------------


@pytest.mark.anyio
async def test_tls_with_a_private_ca_named_by_aws_ca_bundle(
        s3: S3Server, tls_proxy: FaultProxy, ca_file: str, mode: UploaderMode,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", ca_file)
    small, big = tmp_path / "small", tmp_path / "big"
    want_small, want_big = write_random(small, 100_000), write_random(big, 12 * MiB)
    async with backend(tls_proxy.endpoint, mode=mode) as b:
        assert await b.put_file("ck/small", str(small), 100_000) == want_small
        assert await b.put_file("ck/big", str(big), 12 * MiB) == want_big
        await b.put_bytes("ck/m.json", b"{}")
        assert await b.get_bytes("ck/m.json") == b"{}"
        assert await b.get_file("ck/big", str(tmp_path / "out"), 12 * MiB) == want_big
        # The bodies and the reads went through the sender, not botocore's stack.
        assert b._gets is not None and b._gets.sender.requests == 1 + 3
        if mode is UploaderMode.THREAD:
            assert b._plane.plane.sender.requests == 1 + 3  # type: ignore[union-attr]
    assert hashlib.sha256(stored(s3, "ck/big")).hexdigest() == want_big
    assert tls_proxy.count(method="PUT") == 1 + 3 + 1


@pytest.mark.anyio
@pytest.mark.parametrize("elsewhere", [False, True], ids=["untrusted", "system-store-only"])
async def test_without_the_private_ca_the_upload_fails_at_once_saying_what_to_set(
        s3: S3Server, tls_proxy: FaultProxy, ca_file: str, mode: UploaderMode,
        elsewhere: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without a bundle botocore trusts certifi's, not the system store: a CA the system
    store has (here through SSL_CERT_FILE) is no reason for the sender to trust a server."""
    if elsewhere:
        monkeypatch.setenv("SSL_CERT_FILE", ca_file)
    src = tmp_path / "f"
    write_random(src, 1000)
    policy = CountingPolicy(max_attempts=5, deadline=30, initial_backoff=0.01)
    async with backend(tls_proxy.endpoint, mode=mode, policy=policy) as b:
        with pytest.raises(StorageAccessError, match="AWS_CA_BUNDLE") as info:
            await b.put_file("ck/f", str(src), 1000)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) and "ck/f" in str(info.value)
    assert policy.attempts == [1]  # not retried
    assert tls_proxy.requests == []


@pytest.mark.anyio
async def test_an_unreadable_ca_bundle_is_named_before_any_request(
        s3: S3Server, tls_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    async with backend(tls_proxy.endpoint) as b:
        with pytest.raises(StorageAccessError, match=r"missing\.pem.*AWS_CA_BUNDLE"):
            await b.put_bytes("ck/m.json", b"{}")
    assert tls_proxy.requests == []


@pytest.mark.anyio
async def test_verify_false_is_followed(s3: S3Server, tls_proxy: FaultProxy,
                                        tmp_path: Path) -> None:
    src = tmp_path / "f"
    want = write_random(src, 1000)
    async with backend(tls_proxy.endpoint, verify=False) as b:
        assert await b.put_file("ck/f", str(src), 1000) == want
        assert b._plane.plane.sender.requests == 1  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_client_certificate_from_the_config_is_presented(
        s3: S3Server, ca: trustme.CA, ca_file: str, mode: UploaderMode,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    issued = client_ca.issue_cert("checkpoint-client@example.com")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    issued.cert_chain_pems[0].write_to_path(str(cert_file))
    issued.private_key_pem.write_to_path(str(key_file))
    monkeypatch.setenv("AWS_CA_BUNDLE", ca_file)
    small, big = tmp_path / "small", tmp_path / "big"
    want_small, want_big = write_random(small, 1000), write_random(big, 12 * MiB)
    with FaultProxy(s3.endpoint, tls=server_tls(ca, client_ca=client_ca)) as proxy:
        with_cert = Config(read_timeout=READ_TIMEOUT,
                           client_cert=(str(cert_file), str(key_file)))
        async with backend(proxy.endpoint, mode=mode, config=with_cert) as b:
            assert await b.put_file("ck/small", str(small), 1000) == want_small
            assert await b.put_file("ck/big", str(big), 12 * MiB) == want_big
            assert await b.get_bytes("ck/small") == small.read_bytes()
            assert b._gets is not None and b._gets.sender.requests == 1
        assert proxy.count(method="PUT") == 1 + 3
        async with backend(proxy.endpoint, mode=mode) as b:  # the server insists on one
            with pytest.raises(UploadError):
                await b.put_file("ck/small", str(small), 1000)
        assert proxy.count(method="PUT") == 1 + 3


# -- what the sender leaves to botocore --------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["config", "environment"])
async def test_with_a_proxy_every_request_goes_through_botocore(
        s3: S3Server, proxy: FaultProxy, mode: UploaderMode, how: str,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fault proxy as a forward HTTP proxy: what reaches it was sent by a client that
    knows about proxies (absolute-form request targets); the sender would go straight to
    the server, unseen."""
    if how == "environment":
        monkeypatch.setenv("HTTP_PROXY", proxy.endpoint)
        config = FAST
    else:
        config = Config(read_timeout=READ_TIMEOUT, proxies={"http": proxy.endpoint})
    small, big = tmp_path / "small", tmp_path / "big"
    want_small, want_big = write_random(small, 1000), write_random(big, 12 * MiB)
    async with backend(s3.endpoint, mode=mode, config=config) as b:
        assert await b.put_file("ck/small", str(small), 1000) == want_small
        assert await b.put_file("ck/big", str(big), 12 * MiB) == want_big
        assert await b.get_bytes("ck/small") == small.read_bytes()
        assert await b.get_file("ck/big", str(tmp_path / "out"), 12 * MiB) == want_big
        assert b._gets is None
        if mode is UploaderMode.THREAD:
            assert b._plane.plane.sender.requests == 0  # type: ignore[union-attr]
    puts = [r for r in proxy.requests if r.method == "PUT"]
    assert len(puts) == 1 + 3
    assert all(r.path.startswith(s3.endpoint + "/") for r in proxy.requests)
    assert proxy.count(method="GET") == 1 + 3


# -- client options where Metaflow users set them --------------------------------------


@pytest.mark.anyio
async def test_a_config_in_datatools_client_params_reaches_the_client_but_not_its_retries(
        s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    params = {"endpoint_url": s3.endpoint, "config": {
        "read_timeout": READ_TIMEOUT, "retries": {"max_attempts": 10, "mode": "adaptive"}}}
    monkeypatch.setattr(metaflow_config, "DATATOOLS_CLIENT_PARAMS", params)
    ctx = TransferContext(settings=Settings(), limiter=anyio.CapacityLimiter(4),
                          retry=RetryPolicy(max_attempts=3, deadline=30))
    b = s3_backend_factory(f"s3://{BUCKET}/{PREFIX}")(ctx)
    try:
        resolved = (await b._get_client()).meta.config
        assert resolved.read_timeout == READ_TIMEOUT
        assert resolved.retries == {"total_max_attempts": 1, "mode": "standard"}
        await b.put_bytes("ck/m.json", b"{}")
    finally:
        await b.aclose()
    assert stored(s3, "ck/m.json") == b"{}"


def test_a_config_botocore_does_not_know_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metaflow_config, "DATATOOLS_CLIENT_PARAMS",
                        {"config": {"read_timout": 1}})
    with pytest.raises(CheckpointConfigException,
                       match=r"METAFLOW_DATATOOLS_CLIENT_PARAMS.*read_timout"):
        s3_backend_factory(f"s3://{BUCKET}/{PREFIX}")
