"""A fault-injecting HTTP/1.1 reverse proxy for deterministic S3 failure tests.

Tests point an S3 client at ``FaultProxy(upstream).endpoint`` instead of at the (moto)
server. By default every request is forwarded unchanged; rules make chosen requests fail
in the ways a real network and a real S3 fail:

* ``reset``: read the request (body included), then abort the client connection with an
  RST and no response - a dropped connection before the server acted.
* ``error(status, code, message)``: answer an S3-style XML error without forwarding, so
  the server never sees the request (503 SlowDown, 500 InternalError, 403 AccessDenied).
* ``drop_response``: forward the request so the server performs it, then reset the client
  instead of relaying the response - "the server finished, the client never heard".
* ``stall(at)`` / ``cut(at)``: forward the request, then relay only the start of the
  response and either go silent with the connection open (a stalled peer) or close it
  cleanly (a reply cut short). ``at`` is ``"status"`` (the status line only),
  ``"headers"`` (the status line, one header line and part of the next) or ``"body"``
  (the whole head and half the body; a reply without a body is then whole).

Rules are deterministic (``times``, ``every``, seeded ``probability``), every request is
recorded for assertions, and ``hold`` parks matching requests until the test releases them,
which keeps an upload in flight without sleeps.

With ``tls`` (a server-side ``ssl.SSLContext``) the proxy terminates TLS, so a client can
reach the plain-HTTP server through ``https://127.0.0.1:port`` and a private CA.

The proxy runs its own asyncio loop in a daemon thread so that it serves blocking (boto3)
and asynchronous (aioboto3) clients alike. Each proxied request uses a fresh upstream
connection: moto (werkzeug) answers every request with ``Connection: close`` anyway, and a
fresh connection can never be a stale keep-alive one. The client side stays keep-alive,
because clients reuse connections and that path must be exercised. ``Expect: 100-continue``
is answered by the proxy itself and not forwarded: botocore and aiohttp send it on PUTs
with a body, and aiohttp waits for the ``100`` before it sends any body.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import random
import re
import socket
import ssl
import struct
import threading
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any
from xml.sax.saxutils import escape

FORWARD = "forward"
RESET = "reset"
DROP_RESPONSE = "drop_response"
_READ_SIZE = 256 * 1024
# Hop-by-hop headers belong to one connection; the proxy manages both of its own.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "expect", "upgrade"})

Headers = list[tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class ErrorAction:
    status: int
    code: str
    message: str


def error(status: int, code: str, message: str = "Injected by FaultProxy") -> ErrorAction:
    """An action that answers ``status`` with an S3 ``<Error>`` body, never forwarding."""
    return ErrorAction(status, code, message)


_POINTS = ("status", "headers", "body")


@dataclasses.dataclass(frozen=True)
class PartialReply:
    kind: str  # "stall": go silent, the connection open; "cut": close it cleanly
    at: str  # where the relayed response stops: one of _POINTS


def stall(at: str) -> PartialReply:
    """Forward, relay the response up to ``at``, then send nothing more until the client
    gives up and closes (or the proxy closes)."""
    if at not in _POINTS:
        raise ValueError(f"stall point must be one of {_POINTS}, got {at!r}")
    return PartialReply("stall", at)


def cut(at: str) -> PartialReply:
    """Forward, relay the response up to ``at``, then close the connection (FIN, no RST)."""
    if at not in _POINTS:
        raise ValueError(f"cut point must be one of {_POINTS}, got {at!r}")
    return PartialReply("cut", at)


Action = str | ErrorAction | PartialReply


@dataclasses.dataclass
class RequestRecord:
    conn: int  # client connection number: equal numbers mean a reused connection
    method: str
    path: str
    query: str
    action: str  # "forward", "reset", "error", "drop_response", "stall" or "cut"
    status: int | None = None  # what the client received; None if it received nothing
    upstream_status: int | None = None  # what the server answered, if it was asked
    body_bytes: int = 0  # request body bytes the proxy received from the client


@dataclasses.dataclass
class _Match:
    method: str | None
    path_regex: str | None
    query_contains: str | None

    def matches(self, method: str, path: str, query: str) -> bool:
        return ((self.method is None or self.method.upper() == method)
                and (self.path_regex is None or re.search(self.path_regex, path) is not None)
                and (self.query_contains is None or self.query_contains in query))


@dataclasses.dataclass
class Rule:
    action: Action
    match: _Match
    times: int | None = None
    every: int | None = None
    probability: float | None = None
    seed: int = 0
    seen: int = 0  # matching requests considered while the rule was live
    fired: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def fires(self) -> bool:
        # `times` caps how often the rule fires; `every`/`probability` pick which of the
        # matching requests it fires on. A rule that does not fire lets later rules try.
        if self.times is not None and self.fired >= self.times:
            return False
        self.seen += 1
        if self.every is not None and self.seen % self.every:
            return False
        if self.probability is not None and self._rng.random() >= self.probability:
            return False
        self.fired += 1
        return True


class Hold:
    """Parks matching requests (fully read, not yet acted on) until :meth:`release`."""

    def __init__(self, match: _Match, loop: asyncio.AbstractEventLoop) -> None:
        self.match = match
        self._loop = loop
        self._cond = threading.Condition()
        self._held = 0
        self._released = False
        self._event = asyncio.Event()  # only awaited and set on the proxy's loop

    @property
    def held(self) -> int:
        with self._cond:
            return self._held

    def wait_held(self, n: int, timeout: float = 10.0) -> bool:
        """Block until at least ``n`` requests are parked; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._held >= n, timeout)

    def release(self) -> None:
        """Let parked requests continue; later matching requests are no longer held."""
        with self._cond:
            self._released = True
        with contextlib.suppress(RuntimeError):  # the proxy's loop is already closed
            self._loop.call_soon_threadsafe(self._event.set)

    async def _park(self) -> None:
        with self._cond:
            if self._released:
                return
            self._held += 1
            self._cond.notify_all()
        try:
            await self._event.wait()
        finally:
            with self._cond:
                self._held -= 1


class FaultProxy:
    def __init__(self, upstream: str, *, tls: ssl.SSLContext | None = None) -> None:
        url = urllib.parse.urlsplit(upstream)
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self._upstream = (url.hostname, url.port or 80)
        self._tls = tls
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._holds: list[Hold] = []
        self._records: list[RequestRecord] = []
        self._connections = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._startup_error is not None:
            raise RuntimeError("FaultProxy failed to start") from self._startup_error
        self.endpoint = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # already closed
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # -- configuration and inspection, called from the test thread --------------------

    def add_rule(self, action: Action, *, method: str | None = None,
                 path_regex: str | None = None, query_contains: str | None = None,
                 times: int | None = None, every: int | None = None,
                 probability: float | None = None, seed: int = 0) -> Rule:
        """Append a rule; rules are tried in order and the first one that fires wins."""
        if not isinstance(action, ErrorAction | PartialReply) and action not in (
                FORWARD, RESET, DROP_RESPONSE):
            raise ValueError(f"unknown action {action!r}")
        rule = Rule(action, _Match(method, path_regex, query_contains), times, every,
                    probability, seed)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()

    def hold(self, *, method: str | None = None, path_regex: str | None = None,
             query_contains: str | None = None) -> Hold:
        handle = Hold(_Match(method, path_regex, query_contains), self._loop)
        with self._lock:
            self._holds.append(handle)
        return handle

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return [dataclasses.replace(r) for r in self._records]

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def count(self, method: str | None = None, path_regex: str | None = None,
              action: str | None = None, query_contains: str | None = None) -> int:
        match = _Match(method, path_regex, query_contains)
        return sum(1 for r in self.requests if match.matches(r.method, r.path, r.query)
                   and (action is None or r.action == action))

    def sent_bytes(self, method: str | None = None, path_regex: str | None = None) -> int:
        """Request body bytes clients sent through the proxy, for matching requests."""
        match = _Match(method, path_regex, None)
        return sum(r.body_bytes for r in self.requests if match.matches(r.method, r.path, r.query))

    def reset_counters(self) -> None:
        with self._lock:
            self._records.clear()

    # -- the proxy, on its own loop ---------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._startup_error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        # A client that rejects the certificate is what some tests want: not worth a log line.
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, ctx: None if isinstance(ctx.get("exception"), ssl.SSLError | OSError)
            else loop.default_exception_handler(ctx))
        server = await asyncio.start_server(self._client, "127.0.0.1", 0, limit=1 << 20,
                                            ssl=self._tls)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._connections += 1
            conn = self._connections
        try:
            while await self._one_request(conn, reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.transport.abort()  # mid-message failure: the stream is out of sync
        except asyncio.CancelledError:
            # Shutdown. Not re-raised: Python 3.11's start_server callback calls
            # task.exception() on a cancelled task and logs a spurious error.
            writer.transport.abort()
        finally:
            self._tasks.discard(task)
            writer.close()

    def _decide(self, conn: int, method: str, path: str,
                query: str) -> tuple[Action, RequestRecord, Hold | None]:
        with self._lock:
            action: Action = next((r.action for r in self._rules
                                   if r.match.matches(method, path, query) and r.fires()),
                                  FORWARD)
            name = ("error" if isinstance(action, ErrorAction)
                    else action.kind if isinstance(action, PartialReply) else action)
            record = RequestRecord(conn, method, path, query, name)
            self._records.append(record)
            hold = next((h for h in self._holds if h.match.matches(method, path, query)
                         and not h._released), None)
        return action, record, hold

    async def _one_request(self, conn: int, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
        """Serve one request; return whether the client connection stays usable."""
        head = await _read_head(reader)
        if head is None:
            return False
        (method, target, version), headers = head
        path, _, query = target.partition("?")
        tokens = {t.strip().lower() for t in _get(headers, "connection", "").split(",")}
        keep_alive = version == "HTTP/1.1" and "close" not in tokens
        action, record, hold = self._decide(conn, method, path, query)

        if _get(headers, "expect").lower() == "100-continue":
            # Sent even for an empty body, as moto does: aiohttp waits for it unconditionally.
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = _counted(_body(reader, _framing(headers, request=True)), record)
        if hold is not None:
            # Buffer the body so the client has finished sending and just awaits a reply.
            buffered = [chunk async for chunk in body]
            await hold._park()
            body = _replay(buffered)

        if isinstance(action, ErrorAction) or action == RESET:
            async for _ in body:
                pass
            if action == RESET:
                _abort_with_rst(writer)
                return False
            record.status = action.status
            await _send_error(writer, action, method, keep_alive)
            return keep_alive

        up_reader, up_writer = await asyncio.open_connection(*self._upstream, limit=1 << 20)
        try:
            up_writer.write(_head_bytes(f"{method} {target} HTTP/1.1", headers, close=True))
            async for chunk in body:
                up_writer.write(chunk)
                await up_writer.drain()
            status = 100
            while 100 <= status < 200:  # interim responses; the client already had its 100
                if (head := await _read_head(up_reader)) is None:
                    raise ConnectionResetError("upstream closed without a response")
                (_, status_text, reason), resp_headers = head
                status = int(status_text)
            record.upstream_status = status
            resp_framing = _framing(resp_headers, request=False, method=method, status=status)
            if isinstance(action, PartialReply):
                whole = b"".join([c async for c in _body(up_reader, resp_framing)])
                await _partial_reply(reader, writer, action, _head_bytes(
                    f"HTTP/1.1 {status} {reason}", resp_headers, close=False), whole)
                return False
            if action == DROP_RESPONSE:
                async for _ in _body(up_reader, resp_framing):
                    pass
                _abort_with_rst(writer)
                return False
            # A close-delimited body can only be relayed by closing the client side too.
            keep_alive = keep_alive and resp_framing[0] != "eof"
            record.status = status
            writer.write(_head_bytes(f"HTTP/1.1 {status} {reason}", resp_headers,
                                     close=not keep_alive))
            async for chunk in _body(up_reader, resp_framing):
                writer.write(chunk)
                await writer.drain()
            await writer.drain()
            return keep_alive
        finally:
            up_writer.close()


async def _partial_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         action: PartialReply, head: bytes, body: bytes) -> None:
    status_end = head.index(b"\r\n") + 2
    if action.at == "status":
        sent = head[:status_end]
    elif action.at == "headers":
        sent = head[:head.index(b"\r\n", status_end) + 2 + 3]  # one line and 3 bytes more
    else:
        sent = head + body[:len(body) // 2]
    writer.write(sent)
    await writer.drain()
    if action.kind == "cut":
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    with contextlib.suppress(OSError, ValueError):
        while await reader.read(_READ_SIZE):  # until the client gives up
            pass
    writer.transport.abort()


def _abort_with_rst(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER 0 turns close() into an RST, so the client sees ECONNRESET, not a clean EOF.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _send_error(writer: asyncio.StreamWriter, action: ErrorAction, method: str,
                      keep_alive: bool) -> None:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(action.code)}</Code>'
            f"<Message>{escape(action.message)}</Message>"
            "<RequestId>faultproxy</RequestId></Error>").encode()
    reason = http.client.responses.get(action.status, "Error")
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
               ("x-amz-request-id", "faultproxy")]
    writer.write(_head_bytes(f"HTTP/1.1 {action.status} {reason}", headers, close=not keep_alive))
    if method != "HEAD":
        writer.write(body)
    await writer.drain()


def _get(headers: Headers, name: str, default: str = "") -> str:
    return next((v for k, v in headers if k.lower() == name), default)


def _head_bytes(start_line: str, headers: Headers, *, close: bool) -> bytes:
    named = {t.strip().lower() for t in _get(headers, "connection").split(",")}
    lines = [start_line]
    lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _HOP_BY_HOP | named]
    lines.append("Connection: close" if close else "Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _line(reader: asyncio.StreamReader, *, eof_ok: bool = False) -> bytes:
    line = await reader.readline()
    if not line.endswith(b"\n") and not (eof_ok and not line):
        raise asyncio.IncompleteReadError(line, None)
    return line


async def _read_head(reader: asyncio.StreamReader) -> tuple[tuple[str, str, str], Headers] | None:
    """Read a start line and headers; None on a clean EOF between messages."""
    while (line := await _line(reader, eof_ok=True)) in (b"\r\n", b"\n"):
        pass  # a stray CRLF between messages is allowed (RFC 9112 section 2.2)
    if not line:
        return None
    first, second, third = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: Headers = []
    while (raw := await _line(reader)) not in (b"\r\n", b"\n"):
        name, _, value = raw.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    return (first, second, third), headers


Framing = tuple[str, int]  # ("none" | "length" | "chunked" | "eof", content length)


def _framing(headers: Headers, *, request: bool, method: str = "", status: int = 200) -> Framing:
    """How the message body is delimited (RFC 9112 section 6.3)."""
    if not request and (method == "HEAD" or 100 <= status < 200 or status in (204, 304)):
        return "none", 0
    if "chunked" in _get(headers, "transfer-encoding").lower():
        return "chunked", 0
    if length := int(_get(headers, "content-length", "0")):
        return "length", length
    # Without a length a request has no body, but a response runs until the server closes.
    return ("none", 0) if request or _get(headers, "content-length") else ("eof", 0)


async def _body(reader: asyncio.StreamReader, framing: Framing) -> AsyncIterator[bytes]:
    """Yield the body's bytes as on the wire (chunked framing kept), without buffering it."""
    kind, length = framing
    if kind == "length":
        async for piece in _exactly(reader, length):
            yield piece
    elif kind == "chunked":
        while size := int((size_line := await _line(reader)).split(b";")[0].strip(), 16):
            yield size_line
            async for piece in _exactly(reader, size + 2):  # data plus its CRLF
                yield piece
        yield size_line
        while (trailer := await _line(reader)) not in (b"\r\n", b"\n"):
            yield trailer
        yield trailer
    elif kind == "eof":
        while data := await reader.read(_READ_SIZE):
            yield data


async def _counted(chunks: AsyncIterator[bytes], record: RequestRecord) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        record.body_bytes += len(chunk)
        yield chunk


async def _exactly(reader: asyncio.StreamReader, n: int) -> AsyncIterator[bytes]:
    while n > 0:
        data = await reader.read(min(n, _READ_SIZE))
        if not data:
            raise asyncio.IncompleteReadError(data, n)
        n -= len(data)
        yield data


async def _replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
