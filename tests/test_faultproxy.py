"""FaultProxy between real S3 clients and a real moto server: forwarding and every fault."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hashlib
import http.client
import http.server
import random
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
import trustme
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, SSLError
from faultproxy import DROP_RESPONSE, RESET, FaultProxy, cut, error, stall
from s3server import ACCESS_KEY, REGION, SECRET_KEY, S3Server, running_s3_server

pytestmark = pytest.mark.s3

BUCKET = "proxy-test"
MiB = 1024 * 1024
CONFIG = Config(retries={"total_max_attempts": 1}, request_checksum_calculation="when_required",
                response_checksum_validation="when_required")


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with running_s3_server() as s:
        yield s


@pytest.fixture
def upstream(server: S3Server) -> Any:
    server.reset()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def proxy(server: S3Server, upstream: Any) -> Iterator[FaultProxy]:
    with FaultProxy(server.endpoint) as p:
        yield p


@pytest.fixture
def client(proxy: FaultProxy) -> Any:
    return boto3.client("s3", endpoint_url=proxy.endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name=REGION, config=CONFIG)


def exists(upstream: Any, key: str) -> bool:
    try:
        upstream.head_object(Bucket=BUCKET, Key=key)
    except ClientError as exc:
        assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 404
        return False
    return True


def assert_reset_by_peer(exc: ConnectionClosedError) -> None:
    # An RST surfaces as ECONNRESET; a plain close would be http.client.RemoteDisconnected.
    cause = exc.kwargs["error"].args[1]  # urllib3 ProtocolError("Connection aborted.", cause)
    assert isinstance(cause, ConnectionResetError) and cause.errno == errno.ECONNRESET, cause


def test_forwards_put_get_list_and_multipart_over_one_connection(
        proxy: FaultProxy, client: Any, upstream: Any) -> None:
    client.put_object(Bucket=BUCKET, Key="small", Body=b"hello")
    assert client.get_object(Bucket=BUCKET, Key="small")["Body"].read() == b"hello"
    assert client.head_object(Bucket=BUCKET, Key="small")["ContentLength"] == 5
    listed = client.list_objects_v2(Bucket=BUCKET)
    assert [o["Key"] for o in listed["Contents"]] == ["small"]

    rng = random.Random(1)
    parts = [rng.randbytes(5 * MiB + 123), rng.randbytes(5 * MiB)]
    upload_id = client.create_multipart_upload(Bucket=BUCKET, Key="big")["UploadId"]
    etags = [client.upload_part(Bucket=BUCKET, Key="big", UploadId=upload_id, PartNumber=n,
                                Body=part)["ETag"] for n, part in enumerate(parts, 1)]
    client.complete_multipart_upload(
        Bucket=BUCKET, Key="big", UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]})

    whole = b"".join(parts)
    assert upstream.get_object(Bucket=BUCKET, Key="big")["Body"].read() == whole
    via_proxy = client.get_object(Bucket=BUCKET, Key="big")["Body"].read()
    assert hashlib.sha256(via_proxy).digest() == hashlib.sha256(whole).digest()

    records = proxy.requests
    assert len(records) == 9
    assert {r.action for r in records} == {"forward"}
    assert all(r.status == r.upstream_status and r.status in (200, 204) for r in records)
    # The client kept its one connection alive although moto closes every upstream one.
    assert {r.conn for r in records} == {1}
    assert proxy.count(method="PUT", query_contains="partNumber=") == 2


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError"),
                                             (403, "AccessDenied")])
def test_error_answers_without_forwarding(proxy: FaultProxy, client: Any, upstream: Any,
                                          status: int, code: str) -> None:
    proxy.add_rule(error(status, code, "injected"), method="PUT", times=1)
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=BUCKET, Key="k", Body=b"x" * 1000)
    assert info.value.response["Error"]["Code"] == code
    assert info.value.response["Error"]["Message"] == "injected"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert not exists(upstream, "k")

    client.put_object(Bucket=BUCKET, Key="k", Body=b"y")  # times=1: the next one goes through
    assert upstream.get_object(Bucket=BUCKET, Key="k")["Body"].read() == b"y"
    assert [(r.action, r.status, r.upstream_status) for r in proxy.requests] == [
        ("error", status, None), ("forward", 200, 200)]
    assert {r.conn for r in proxy.requests} == {1}  # an error response keeps the connection


def test_reset_drops_the_connection_before_the_server_acts(
        proxy: FaultProxy, client: Any, upstream: Any) -> None:
    proxy.add_rule(RESET, method="PUT", times=1)
    with pytest.raises(ConnectionClosedError) as info:
        client.put_object(Bucket=BUCKET, Key="k", Body=b"x" * (2 * MiB))
    assert_reset_by_peer(info.value)
    assert not exists(upstream, "k")
    assert [(r.action, r.status) for r in proxy.requests] == [("reset", None)]

    proxy.add_rule(RESET, method="GET", path_regex="/k$")
    client.put_object(Bucket=BUCKET, Key="k", Body=b"y")
    with pytest.raises(ConnectionClosedError) as info:
        client.get_object(Bucket=BUCKET, Key="k")
    assert_reset_by_peer(info.value)
    assert exists(upstream, "k")
    client.list_objects_v2(Bucket=BUCKET)
    assert proxy.count(action="reset") == 2 and proxy.count(action="forward") == 2
    # Each reset costs the client its connection; the next request opens a new one.
    assert [r.conn for r in proxy.requests] == [1, 2, 2, 3]


def test_drop_response_performs_the_request_but_the_client_never_hears(
        proxy: FaultProxy, client: Any, upstream: Any) -> None:
    proxy.add_rule(DROP_RESPONSE, method="PUT", path_regex="/dropped$")
    with pytest.raises(ConnectionClosedError) as info:
        client.put_object(Bucket=BUCKET, Key="dropped", Body=b"z" * (3 * MiB))
    assert_reset_by_peer(info.value)
    assert upstream.get_object(Bucket=BUCKET, Key="dropped")["Body"].read() == b"z" * (3 * MiB)
    [record] = proxy.requests
    assert (record.action, record.status, record.upstream_status) == ("drop_response", None, 200)


def test_times_every_and_probability_are_deterministic(proxy: FaultProxy, client: Any) -> None:
    def outcomes(n: int) -> list[bool]:
        proxy.reset_counters()
        result = []
        for _ in range(n):
            try:
                client.list_objects_v2(Bucket=BUCKET)
                result.append(True)
            except ClientError as exc:
                assert exc.response["Error"]["Code"] == "SlowDown"
                result.append(False)
        assert proxy.count(action="error") == result.count(False)
        return result

    proxy.add_rule(error(503, "SlowDown"), method="GET", times=2)
    assert outcomes(5) == [False, False, True, True, True]

    proxy.clear_rules()
    proxy.add_rule(error(503, "SlowDown"), every=3)
    assert outcomes(7) == [True, True, False, True, True, False, True]

    proxy.clear_rules()
    proxy.add_rule(error(503, "SlowDown"), every=2, times=2)  # fires on 2nd and 4th only
    assert outcomes(8) == [True, False, True, False, True, True, True, True]

    rng = random.Random(42)
    expected = [rng.random() >= 0.3 for _ in range(40)]
    assert 5 < expected.count(False) < 20  # the seed really mixes outcomes
    for _ in range(2):
        proxy.clear_rules()
        rule = proxy.add_rule(error(503, "SlowDown"), probability=0.3, seed=42)
        assert outcomes(40) == expected
        assert (rule.seen, rule.fired) == (40, expected.count(False))


def test_first_matching_rule_wins_and_filters_apply(proxy: FaultProxy, client: Any,
                                                    upstream: Any) -> None:
    proxy.add_rule(error(500, "InternalError"), method="PUT", query_contains="partNumber=2")
    proxy.add_rule(error(403, "AccessDenied"), method="PUT")
    proxy.add_rule(RESET)
    upload_id = upstream.create_multipart_upload(Bucket=BUCKET, Key="mp")["UploadId"]
    codes = []
    for n in (1, 2):
        with pytest.raises(ClientError) as info:
            client.upload_part(Bucket=BUCKET, Key="mp", UploadId=upload_id, PartNumber=n,
                               Body=b"p" * 100)
        codes.append(info.value.response["Error"]["Code"])
    assert codes == ["AccessDenied", "InternalError"]
    with pytest.raises(ConnectionClosedError):
        client.list_objects_v2(Bucket=BUCKET)
    assert [r.action for r in proxy.requests] == ["error", "error", "reset"]


def test_hold_parks_requests_until_released(proxy: FaultProxy, client: Any,
                                            upstream: Any) -> None:
    hold = proxy.hold(method="PUT", path_regex="/held-")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(client.put_object, Bucket=BUCKET, Key=f"held-{i}",
                               Body=b"h" * (6 * MiB)) for i in range(2)]
        assert hold.wait_held(2, timeout=30)
        client.put_object(Bucket=BUCKET, Key="free", Body=b"f")  # other keys pass by
        assert exists(upstream, "free")
        assert not any(f.done() for f in futures)
        assert not exists(upstream, "held-0") and not exists(upstream, "held-1")
        hold.release()
        for f in futures:
            assert f.result(timeout=30)["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert hold.held == 0
    assert exists(upstream, "held-0") and exists(upstream, "held-1")
    client.put_object(Bucket=BUCKET, Key="held-2", Body=b"late")  # a released hold stays open
    assert hold.held == 0 and exists(upstream, "held-2")


def test_aiobotocore_client_through_proxy(proxy: FaultProxy, upstream: Any) -> None:
    # aiohttp waits for "100 Continue" before sending a body, without botocore's 1 s timeout.
    import aioboto3

    async def scenario() -> bytes:
        session = aioboto3.Session()
        async with session.client("s3", endpoint_url=proxy.endpoint, region_name=REGION,
                                  aws_access_key_id=ACCESS_KEY,
                                  aws_secret_access_key=SECRET_KEY, config=CONFIG) as s3:
            await s3.put_object(Bucket=BUCKET, Key="a", Body=b"a" * (6 * MiB))
            with pytest.raises(ClientError):
                await s3.put_object(Bucket=BUCKET, Key="b", Body=b"b")
            response = await s3.get_object(Bucket=BUCKET, Key="a")
            async with response["Body"] as body:
                return bytes(await body.read())

    proxy.add_rule(error(503, "SlowDown"), method="PUT", path_regex="/b$")
    assert asyncio.run(asyncio.wait_for(scenario(), 60)) == b"a" * (6 * MiB)
    assert not exists(upstream, "b")
    assert [r.action for r in proxy.requests] == ["forward", "error", "forward"]
    assert {r.conn for r in proxy.requests} == {1}


def test_chunked_bodies_both_ways_on_a_kept_alive_connection() -> None:
    # moto never sends a chunked response, so a stub upstream does.
    class Chunky(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self) -> None:
            assert self.headers["Transfer-Encoding"] == "chunked"
            received = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                received += self.rfile.read(size + 2)[:-2]
            assert self.rfile.readline() == b"\r\n"
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (received, b"!", b""):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))

        def log_message(self, *args: Any) -> None:
            pass

    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chunky)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{stub.server_address[1]}") as proxy:
            conn = http.client.HTTPConnection("127.0.0.1", int(proxy.endpoint.rsplit(":", 1)[1]))
            for word in (b"hello", b"again"):
                conn.request("PUT", "/x", body=iter([word[:2], word[2:]]), encode_chunked=True)
                response = conn.getresponse()
                assert response.getheader("Transfer-Encoding") == "chunked"
                assert response.read() == word + b"!"
            conn.close()
            assert proxy.connections == 1
            assert [r.status for r in proxy.requests] == [200, 200]
    finally:
        stub.shutdown()
        stub.server_close()


def _raw_get(url: str) -> socket.socket:
    """Send a GET for ``url`` (presigned for the proxy) on a new socket; return the socket."""
    u = urllib.parse.urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(f"GET {u.path}?{u.query} HTTP/1.1\r\nHost: {u.netloc}\r\n\r\n".encode())
    return sock


def _expected_start(at: str, whole: bytes) -> bytes:
    head, _, body = whole.partition(b"\r\n\r\n")
    status_end = head.index(b"\r\n") + 2
    if at == "status":
        return head[:status_end]
    if at == "headers":
        return head[:head.index(b"\r\n", status_end) + 5]
    return head + b"\r\n\r\n" + body[:len(body) // 2]


def _whole_reply(url: str) -> bytes:
    with _raw_get(url) as sock:
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < 1000:
            data += sock.recv(65536)
    return data


@pytest.mark.parametrize("at", ["status", "headers", "body"])
def test_cut_relays_the_start_of_the_reply_then_closes(proxy: FaultProxy, client: Any,
                                                       upstream: Any, at: str) -> None:
    upstream.put_object(Bucket=BUCKET, Key="k", Body=b"v" * 1000)
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "k"})
    proxy.add_rule(cut(at), method="GET", times=1)
    with _raw_get(url) as sock:
        received = b""
        while chunk := sock.recv(65536):  # until the proxy closes: a clean FIN
            received += chunk
    whole = _whole_reply(url)  # times=1: the next one is whole
    assert whole.startswith(b"HTTP/1.1 200 ") and whole.endswith(b"v" * 1000)
    # Headers such as Date and the request id differ between replies; compare shapes.
    expected = _expected_start(at, whole)
    assert len(received) == len(expected) and received[:17] == expected[:17]
    if at == "body":
        assert received.endswith(b"\r\n\r\n" + b"v" * 500)
    else:
        assert b"\r\n\r\n" not in received
    assert [(r.action, r.status, r.upstream_status) for r in proxy.requests] == [
        ("cut", None, 200), ("forward", 200, 200)]


@pytest.mark.parametrize("at", ["status", "headers", "body"])
def test_stall_relays_the_start_of_the_reply_then_goes_silent(proxy: FaultProxy, client: Any,
                                                              upstream: Any, at: str) -> None:
    upstream.put_object(Bucket=BUCKET, Key="k", Body=b"v" * 1000)
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "k"})
    expected = _expected_start(at, _whole_reply(url))
    proxy.add_rule(stall(at), method="GET", times=1)
    with _raw_get(url) as sock:
        received = b""
        while len(received) < len(expected):
            received += sock.recv(65536)
        assert len(received) == len(expected) and received[:17] == expected[:17]
        sock.settimeout(0.2)  # the proxy keeps the connection open and sends nothing more
        with pytest.raises(TimeoutError):
            sock.recv(65536)
    assert [(r.action, r.status) for r in proxy.requests] == [("forward", 200), ("stall", None)]


def test_partial_reply_points_are_checked() -> None:
    with pytest.raises(ValueError, match="status"):
        stall("middle")
    with pytest.raises(ValueError, match="status"):
        cut("")


def test_tls_termination_with_a_private_ca(server: S3Server, upstream: Any,
                                           tmp_path: Any) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(tls)
    with FaultProxy(server.endpoint, tls=tls) as proxy:
        assert proxy.endpoint.startswith("https://127.0.0.1:")
        trusting = boto3.client("s3", endpoint_url=proxy.endpoint, verify=str(ca_file),
                                aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                region_name=REGION, config=CONFIG)
        trusting.put_object(Bucket=BUCKET, Key="k", Body=b"over tls")
        assert trusting.get_object(Bucket=BUCKET, Key="k")["Body"].read() == b"over tls"
        default = boto3.client("s3", endpoint_url=proxy.endpoint,
                               aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                               region_name=REGION, config=CONFIG)
        with pytest.raises(SSLError, match="CERTIFICATE_VERIFY_FAILED"):
            default.list_objects_v2(Bucket=BUCKET)
        assert [r.method for r in proxy.requests] == ["PUT", "GET"]
