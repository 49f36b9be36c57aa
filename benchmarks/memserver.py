"""A small in-memory S3 endpoint for the benchmarks: cheap enough not to set the pace.

Plain-file servers spend most of an upload writing and assembling parts, which hides the
client's own cost. This one keeps every object in memory, reads request bodies straight
into their final buffer (``recv_into``), assembles a multipart object without copying its
parts, answers from those buffers with one ``sendall`` per range, and never checks a
signature or a checksum. One thread per connection, blocking sockets: the bytes move in
system calls that release the GIL, so the server's threads barely compete.

It speaks the part of S3 the benchmarks use: bucket create/list, Put/Get/Head/Delete
object (ranged GETs too), the multipart calls and ListObjectsV2 (1,000 keys a page).
``--delay-ms`` adds a fixed latency to every request (after its body arrives, before the
response starts), as a remote endpoint would; ``--bandwidth-mbps`` caps each connection at
that many 10^6 bytes/s, paced on every body in both directions (request bodies are read,
and response bodies sent, no faster). ``--wan`` sets both as a WAN profile: 30 ms and
100 MB/s per connection, what one connection to S3 in another place sees. The environment
variables ``MEMSERVER_DELAY_MS`` and ``MEMSERVER_BANDWIDTH_MBPS`` give the defaults.

    python benchmarks/memserver.py [--port 0] [--delay-ms 0] [--bandwidth-mbps 0] [--wan]
    # prints "READY <url>"
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import BinaryIO
from xml.sax.saxutils import escape

_PART_RE = re.compile(rb"<PartNumber>\s*(\d+)\s*</PartNumber>")
_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")
_PAGE = 1000
WAN_DELAY_MS = 30.0  # per request, before the response starts
WAN_BANDWIDTH_MBPS = 100.0  # per connection, each direction


class Pacer:
    """One connection's bandwidth cap: bytes move no faster than ``rate`` bytes/s. Idle
    time earns no credit (a connection that was quiet starts at the rate, not above it)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.due = 0.0
        # Bytes moved between two checks: 10 ms at the rate, from 64 KiB to 1 MiB.
        self.chunk = int(min(1 << 20, max(64 << 10, rate / 100))) if rate else 0

    def start(self) -> float:
        return time.monotonic()

    def moved(self, began: float, nbytes: int) -> None:
        """``nbytes`` moved since ``began``: wait until the rate allows them."""
        self.due = max(self.due, began) + nbytes / self.rate
        wait = self.due - time.monotonic()
        if wait > 0:
            time.sleep(wait)


class Object:
    """An object's bytes as the buffers they arrived in (parts are not joined)."""

    __slots__ = ("chunks", "etag", "size")

    def __init__(self, chunks: list[bytearray], etag: str) -> None:
        self.chunks = chunks
        self.size = sum(len(c) for c in chunks)
        self.etag = etag

    def ranges(self, start: int, end: int) -> Iterator[memoryview]:
        """Views of bytes ``start`` up to ``end`` (exclusive), without copying."""
        pos = 0
        for chunk in self.chunks:
            lo, hi = max(start, pos), min(end, pos + len(chunk))
            if lo < hi:
                yield memoryview(chunk)[lo - pos:hi - pos]
            pos += len(chunk)


class Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buckets: dict[str, dict[str, Object]] = {}
        self.uploads: dict[str, dict[int, bytearray]] = {}
        self._ids = itertools.count(1)

    def next_id(self) -> int:
        with self.lock:
            return next(self._ids)


class Request:
    def __init__(self, method: str, target: str, headers: dict[str, str]) -> None:
        self.method = method
        url = urllib.parse.urlsplit(target)
        self.path = urllib.parse.unquote(url.path)
        self.query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        self.headers = headers
        bucket, _, key = self.path.lstrip("/").partition("/")
        self.bucket, self.key = bucket, key


def _read_head(rfile: BinaryIO) -> tuple[str, str, dict[str, str]] | None:
    line = rfile.readline(65537)
    while line in (b"\r\n", b"\n"):
        line = rfile.readline(65537)
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (raw := rfile.readline(65537)) not in (b"\r\n", b"\n", b""):
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _read_exact(rfile: BinaryIO, buf: bytearray, pacer: Pacer | None = None) -> None:
    view, got = memoryview(buf), 0
    while got < len(buf):
        if pacer is None:
            n = rfile.readinto(view[got:])  # type: ignore[attr-defined]
        else:
            began = pacer.start()
            n = rfile.readinto(view[got:got + pacer.chunk])  # type: ignore[attr-defined]
            if n:
                pacer.moved(began, n)
        if not n:
            raise ConnectionResetError("client closed mid-body")
        got += n


def _read_chunked(rfile: BinaryIO, pacer: Pacer | None = None) -> bytearray:
    """HTTP chunked framing, and aws-chunked (the same, with signature extensions)."""
    out = bytearray()
    while True:
        size = int(rfile.readline(65537).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return out
        chunk = bytearray(size)
        _read_exact(rfile, chunk, pacer)
        out += chunk
        rfile.readline(65537)


def _read_body(rfile: BinaryIO, headers: dict[str, str],
               pacer: Pacer | None = None) -> bytearray:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _read_chunked(rfile, pacer)
    else:
        body = bytearray(int(headers.get("content-length", "0") or 0))
        _read_exact(rfile, body, pacer)
    if "aws-chunked" in headers.get("content-encoding", "") and body:
        import io

        body = _read_chunked(io.BytesIO(bytes(body)))
    return body


class Handler:
    def __init__(self, store: Store, sock: socket.socket, delay: float,
                 rate: float = 0.0) -> None:
        self.store, self.sock, self.delay = store, sock, delay
        self.pacer = Pacer(rate) if rate else None

    def send_paced(self, data: bytes | memoryview) -> None:
        pacer = self.pacer
        if pacer is None:
            self.sock.sendall(data)
            return
        view = memoryview(data)
        for pos in range(0, len(view), pacer.chunk):
            began = pacer.start()
            piece = view[pos:pos + pacer.chunk]
            self.sock.sendall(piece)
            pacer.moved(began, len(piece))

    def serve(self) -> None:
        rfile = self.sock.makefile("rb", buffering=256 * 1024)
        try:
            while True:
                head = _read_head(rfile)
                if head is None:
                    return
                method, target, headers = head
                if headers.get("expect", "").lower() == "100-continue":
                    self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(rfile, headers, self.pacer)
                if self.delay:
                    time.sleep(self.delay)
                if not self.dispatch(Request(method, target, headers), body):
                    return
                if headers.get("connection", "").lower() == "close":
                    return
        except (OSError, ValueError):
            return
        finally:
            with contextlib.suppress(OSError):
                rfile.close()
                self.sock.close()

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              *, payload: Iterator[memoryview] | None = None, length: int | None = None,
              head_only: bool = False) -> bool:
        reason = {200: "OK", 204: "No Content", 206: "Partial Content", 404: "Not Found",
                  400: "Bad Request", 416: "Range Not Satisfiable"}.get(status, "OK")
        size = len(body) if length is None else length
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {size}",
                 "x-amz-request-id: mem"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body and "Content-Type" not in (headers or {}):
            lines.append("Content-Type: application/xml")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if head_only:
            self.sock.sendall(head)
        elif payload is None:
            self.send_paced(head + body)
        else:
            self.sock.sendall(head)
            for view in payload:
                self.send_paced(view)
        return True

    def error(self, status: int, code: str) -> bool:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>{code}</Message></Error>").encode()
        return self.reply(status, body)

    def dispatch(self, r: Request, body: bytearray) -> bool:
        s = self.store
        if not r.bucket:
            names = "".join(f"<Bucket><Name>{escape(b)}</Name></Bucket>" for b in s.buckets)
            return self.reply(200, f"<ListAllMyBucketsResult><Buckets>{names}</Buckets>"
                                   "</ListAllMyBucketsResult>".encode())
        if r.bucket.startswith("moto-api"):
            s.buckets.clear()
            return self.reply(200)
        if not r.key:
            if r.method == "PUT":
                s.buckets.setdefault(r.bucket, {})
                return self.reply(200)
            if r.bucket not in s.buckets:
                return self.error(404, "NoSuchBucket")
            if r.method == "GET":
                return self.list_objects(r)
            return self.reply(204)
        objects = s.buckets.get(r.bucket)
        if objects is None:
            return self.error(404, "NoSuchBucket")
        if r.method == "POST" and "uploads" in r.query:
            upload_id = f"u{s.next_id()}"
            s.uploads[upload_id] = {}
            return self.reply(200, f"<InitiateMultipartUploadResult><Bucket>{r.bucket}</Bucket>"
                                   f"<Key>{escape(r.key)}</Key><UploadId>{upload_id}</UploadId>"
                                   "</InitiateMultipartUploadResult>".encode())
        if r.method == "PUT" and "uploadId" in r.query:
            parts = s.uploads.get(r.query["uploadId"])
            if parts is None:
                return self.error(404, "NoSuchUpload")
            parts[int(r.query["partNumber"])] = body
            return self.reply(200, headers={"ETag": f'"p{s.next_id():031d}"'})
        if r.method == "POST" and "uploadId" in r.query:
            parts = s.uploads.pop(r.query["uploadId"], None)
            if parts is None:
                return self.error(404, "NoSuchUpload")
            numbers = [int(n) for n in _PART_RE.findall(bytes(body))]
            etag = f'"m{s.next_id():031d}-{len(numbers)}"'
            objects[r.key] = Object([parts[n] for n in numbers], etag)
            return self.reply(200, f"<CompleteMultipartUploadResult><Key>{escape(r.key)}</Key>"
                                   f"<ETag>{escape(etag)}</ETag>"
                                   "</CompleteMultipartUploadResult>".encode())
        if r.method == "DELETE" and "uploadId" in r.query:
            s.uploads.pop(r.query["uploadId"], None)
            return self.reply(204)
        if r.method == "PUT":
            if "x-amz-copy-source" in r.headers:
                return self.error(400, "NotImplemented")
            objects[r.key] = Object([body], f'"s{s.next_id():031d}"')
            return self.reply(200, headers={"ETag": objects[r.key].etag})
        if r.method == "DELETE":
            objects.pop(r.key, None)
            return self.reply(204)
        obj = objects.get(r.key)
        if obj is None:
            return self.error(404, "NoSuchKey") if r.method == "GET" else \
                self.reply(404, head_only=True)
        start, end, status = 0, obj.size, 200
        headers = {"ETag": obj.etag, "Content-Type": "application/octet-stream",
                   "Last-Modified": "Mon, 30 Nov 2026 00:00:00 GMT", "Accept-Ranges": "bytes"}
        if m := _RANGE_RE.match(r.headers.get("range", "")):
            start = int(m.group(1))
            end = min(obj.size, int(m.group(2)) + 1) if m.group(2) else obj.size
            if start >= obj.size:
                return self.error(416, "InvalidRange")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{obj.size}"
        return self.reply(status, headers=headers, payload=obj.ranges(start, end),
                          length=end - start, head_only=r.method == "HEAD")

    def list_objects(self, r: Request) -> bool:
        objects = self.store.buckets[r.bucket]
        prefix = r.query.get("prefix", "")
        after = r.query.get("continuation-token") or r.query.get("start-after", "")
        limit = min(int(r.query.get("max-keys", _PAGE)), _PAGE)
        delimiter = r.query.get("delimiter", "")
        keys = sorted(k for k in list(objects) if k.startswith(prefix) and k > after)
        if delimiter:  # keys below the next delimiter fold into one common prefix
            folded: list[str] = []
            for k in keys:
                cut = k.find(delimiter, len(prefix))
                name = k if cut < 0 else k[:cut + len(delimiter)]
                if not folded or folded[-1] != name:
                    folded.append(name)
            keys = [k for k in folded if k > after]
        page, truncated = keys[:limit], len(keys) > limit
        common = "".join(f"<CommonPrefixes><Prefix>{escape(k)}</Prefix></CommonPrefixes>"
                         for k in page if delimiter and k.endswith(delimiter)
                         and k not in objects)
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><Size>{objects[k].size}</Size>"
            f"<ETag>{escape(objects[k].etag)}</ETag>"
            "<LastModified>2026-11-30T00:00:00.000Z</LastModified>"
            "<StorageClass>STANDARD</StorageClass></Contents>"
            for k in page if k in objects)
        token = (f"<NextContinuationToken>{escape(page[-1])}</NextContinuationToken>"
                 if truncated else "")
        return self.reply(200, (
            f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>{r.bucket}</Name>'
            f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount>"
            f"<MaxKeys>{limit}</MaxKeys><IsTruncated>{str(truncated).lower()}</IsTruncated>"
            f"{token}{contents}{common}</ListBucketResult>").encode())


def serve(port: int, delay: float, ready: BinaryIO | None = None, rate: float = 0.0) -> None:
    store = Store()
    listener = socket.create_server(("127.0.0.1", port), backlog=256)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    if ready is not None:
        ready.write(f"READY {url}\n".encode())
        ready.flush()
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=Handler(store, sock, delay, rate).serve, daemon=True).start()


class MemServer:
    """The endpoint in a child process (so it never shares this process's GIL)."""

    def __init__(self, *, delay_ms: float = 0.0, bandwidth_mbps: float = 0.0) -> None:
        self.delay_ms, self.bandwidth_mbps = delay_ms, bandwidth_mbps
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--delay-ms", str(delay_ms),
             "--bandwidth-mbps", str(bandwidth_mbps)],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"memserver did not start: {line!r}")
        self.url = line.split()[1]

    def __enter__(self) -> MemServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay-ms", type=float,
                    default=_env_float(ap, "MEMSERVER_DELAY_MS"),
                    help="added to every request, before its response starts "
                         "(default: $MEMSERVER_DELAY_MS or 0)")
    ap.add_argument("--bandwidth-mbps", type=float,
                    default=_env_float(ap, "MEMSERVER_BANDWIDTH_MBPS"),
                    help="each connection's cap in 10^6 bytes/s, each direction; 0: none "
                         "(default: $MEMSERVER_BANDWIDTH_MBPS or 0)")
    ap.add_argument("--wan", action="store_true",
                    help=f"a WAN profile: --delay-ms {WAN_DELAY_MS:g} --bandwidth-mbps "
                         f"{WAN_BANDWIDTH_MBPS:g}")
    args = ap.parse_args()
    if args.wan:
        args.delay_ms, args.bandwidth_mbps = WAN_DELAY_MS, WAN_BANDWIDTH_MBPS
    if args.delay_ms < 0 or args.bandwidth_mbps < 0:
        ap.error("--delay-ms and --bandwidth-mbps must be 0 or more")
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.port, args.delay_ms / 1000, sys.stdout.buffer,
              rate=args.bandwidth_mbps * 1e6)


def _env_float(ap: argparse.ArgumentParser, name: str) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return 0.0
    try:
        return float(text)
    except ValueError:
        ap.error(f"{name}={text!r} is not a number; set it to milliseconds or MB/s, or unset it")


if __name__ == "__main__":
    main()
