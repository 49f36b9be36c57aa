"""Send a signed S3 request whose body is a buffer, from a worker thread, in one system call.

Why not aiohttp: the event loop's thread needs the GIL back after every system call, and
while the training loop computes it gets it only at the switch interval (5 ms). aiohttp
writes a body as 64 KiB slices, each an event-loop iteration and a ``send()``, so an
upload in flight with training moved about 64 KiB per 5 ms (36 MB/s where the idle loop
let it run at 450 MB/s). Here a part body goes out with one ``sendall`` on a blocking
socket: the kernel moves all of it while the GIL is free, and the Python around it
(building the head, parsing a small reply) is a handful of GIL acquisitions per part.

The sender plugs in below a botocore client through its ``before-send`` event, so
requests are still built, signed and parsed by botocore (its errors, its response
parsing); only the bytes travel differently. Requests whose body is not a
:class:`~..plane.parts.PartBody` go through botocore's own HTTP stack.

Plain sockets are blocking (no Python-level timeout, which would poll before every send
and hand the GIL back and forth); ``SO_SNDTIMEO``/``SO_RCVTIMEO`` bound a stalled peer
instead, and replies are read strictly (:mod:`.reply`): a stall raises botocore's
``ReadTimeoutError`` and a reply cut short ``ConnectionClosedError`` or
``IncompleteReadError``, never a partial success. TLS sockets keep a Python-level timeout:
OpenSSL retries a receive that ``SO_RCVTIMEO`` interrupted, forever. TLS is set up the
way the botocore client it serves would set it up (:mod:`.transport`).
"""

from __future__ import annotations

import contextlib
import http.client
import mmap
import os
import socket
import ssl
import struct
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from botocore.awsrequest import HeadersDict
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    SSLError,
)

from ..plane.jobs import Cancelled
from ..plane.parts import PartBody
from .reply import open_reply
from .transport import ClientCert, tls_context

__all__ = ["BlockingSender", "sync_hook"]

# Headers of one connection, or that the sender sets itself.
_SKIP = frozenset({"expect", "connection", "host", "content-length", "transfer-encoding"})
_MAX_IDLE = 64


class _Raw:
    """A reply body as botocore's ``AWSResponse`` reads one."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self) -> Any:
        yield self._data


class BlockingSender:
    """A pool of keep-alive blocking connections; :meth:`send` runs in a worker thread."""

    def __init__(self, *, verify: bool | str = True, client_cert: ClientCert = None,
                 connect_timeout: float = 10, read_timeout: float = 120) -> None:
        self._verify = verify
        self._client_cert = client_cert
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: dict[tuple[str, str, int], list[socket.socket]] = {}
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self._local = threading.local()  # the job the calling thread sends for
        self._active: dict[int, socket.socket | None] = {}  # job -> its socket, while sending
        self._cancelled: set[int] = set()
        self.requests = 0  # sent through here, for tests and benchmarks

    def _context(self) -> ssl.SSLContext:
        with self._lock:
            if self._ssl is None:
                self._ssl = tls_context(self._verify, self._client_cert)
            return self._ssl

    def _connect(self, scheme: str, host: str, port: int) -> socket.socket:
        endpoint = f"{scheme}://{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=self._connect_timeout)
        except TimeoutError as e:
            raise ConnectTimeoutError(endpoint_url=endpoint, error=e) from e
        except OSError as e:
            raise EndpointConnectionError(endpoint_url=endpoint, error=e) from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                try:  # the handshake, under the connect timeout
                    sock = self._context().wrap_socket(sock, server_hostname=host)
                except ssl.SSLError as e:  # a certificate that fails verification included
                    raise SSLError(endpoint_url=endpoint, error=e) from e
                except TimeoutError as e:
                    raise ConnectTimeoutError(endpoint_url=endpoint, error=e) from e
                sock.settimeout(self._read_timeout)
            else:
                sock.settimeout(None)  # blocking: one sendall is one system call
                whole = int(self._read_timeout)
                tv = struct.pack("ll", whole, int((self._read_timeout - whole) * 1e6))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        except BaseException:
            sock.close()
            raise
        return sock

    def _take(self, where: tuple[str, str, int]) -> tuple[socket.socket, bool]:
        with self._lock:
            idle = self._idle.get(where)
            if idle:
                return idle.pop(), True
        return self._connect(*where), False

    def _give_back(self, where: tuple[str, str, int], sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(where, [])
            if len(idle) < _MAX_IDLE:
                idle.append(sock)
                return
        sock.close()

    def bind(self, job_id: int | None) -> None:
        """Tag what this thread sends next as ``job_id``'s, so :meth:`cancel` can cut it."""
        self._local.job = job_id

    def cancelled(self, job_id: int) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def forget(self, job_id: int) -> None:
        with self._lock:
            self._cancelled.discard(job_id)
            self._active.pop(job_id, None)

    def cancel(self, job_id: int) -> None:
        with self._lock:
            self._cancelled.add(job_id)
            sock = self._active.get(job_id)
        if sock is not None:
            # Wakes a sendmsg or recv blocked in another thread; it then fails at once.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _enter(self, sock: socket.socket) -> None:
        job = getattr(self._local, "job", None)
        if job is None:
            return
        with self._lock:
            if job in self._cancelled:
                raise Cancelled(f"request {job} was cancelled")
            self._active[job] = sock

    def _leave(self) -> None:
        job = getattr(self._local, "job", None)
        if job is not None:
            with self._lock:
                self._active.pop(job, None)

    def close(self) -> None:
        with self._lock:
            socks = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def send(self, method: str, url: str, headers: Mapping[str, str | bytes],
             body: memoryview, *, into: Callable[[http.client.HTTPResponse], None] | None = None
             ) -> tuple[int, HeadersDict, bytes]:
        """Send one request and read its reply: (status, headers, body bytes). With
        ``into``, a 2xx reply's body is left for ``into`` to read (all of it), and the
        returned body is empty."""
        u = urllib.parse.urlsplit(url)
        scheme = u.scheme.lower()
        where = (scheme, u.hostname or "", u.port or (443 if scheme == "https" else 80))
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {u.netloc}",
                 f"Content-Length: {len(body)}"]
        # botocore keeps signed header values as bytes.
        lines += [f"{k}: {v.decode('latin-1') if isinstance(v, bytes) else v}"
                  for k, v in headers.items() if k.lower() not in _SKIP]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.requests += 1
        for attempt in (1, 2):
            sock, reused = self._take(where)
            try:
                self._enter(sock)
                try:
                    return self._exchange(sock, where, method, head, body, into)
                finally:
                    self._leave()
            except Cancelled:
                sock.close()
                raise
            except (ConnectionError, http.client.RemoteDisconnected) as e:
                # A keep-alive connection the server closed meanwhile fails before any
                # reply: send again once on a new one (a PUT of the same bytes is
                # idempotent). Otherwise it is the caller's to retry.
                if reused and attempt == 1:
                    continue
                raise ConnectionClosedError(endpoint_url=url, error=e) from e
            except (TimeoutError, BlockingIOError) as e:
                # A stalled peer: a TLS socket's timeout, or SO_SNDTIMEO/SO_RCVTIMEO (EAGAIN
                # on a blocking socket: a send; a receive raises TimeoutError, .reply).
                raise ReadTimeoutError(endpoint_url=url, error=e) from e
            except http.client.IncompleteRead as e:  # a body shorter than announced
                got = len(e.partial)
                raise IncompleteReadError(actual_bytes=got,
                                          expected_bytes=got + (e.expected or 0)) from e
            except (OSError, http.client.HTTPException) as e:  # a head cut short included
                raise ConnectionClosedError(endpoint_url=url, error=e) from e
        raise AssertionError("unreachable")

    def _exchange(self, sock: socket.socket, where: tuple[str, str, int], method: str,
                  head: bytes, body: memoryview,
                  into: Callable[[http.client.HTTPResponse], None] | None
                  ) -> tuple[int, HeadersDict, bytes]:
        keep = False
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.sendall(head)
                sock.sendall(body)
            else:
                sent = sock.sendmsg([head, body])  # head and body, one system call
                if sent < len(head):  # interrupted part-way: finish what is left
                    sock.sendall(head[sent:])
                    sock.sendall(body)
                elif sent < len(head) + len(body):
                    sock.sendall(body[sent - len(head):])
            resp = open_reply(sock, method)
            try:
                if into is not None and 200 <= resp.status < 300:
                    into(resp)
                    data = b""
                    keep = resp.isclosed() and not resp.will_close
                else:
                    data = resp.read()
                    keep = not resp.will_close
                return resp.status, HeadersDict(resp.getheaders()), data
            finally:
                resp.close()
        finally:
            if keep:
                self._give_back(where, sock)
            else:
                with contextlib.suppress(OSError):
                    sock.close()


def _receive(resp: http.client.HTTPResponse, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = resp.readinto(view[got:])
        if not n:
            raise IncompleteReadError(actual_bytes=got, expected_bytes=len(view))
        got += n


def sync_hook(sender: BlockingSender) -> Any:
    """A ``before-send`` handler for a (synchronous) botocore client: requests whose body is
    a :class:`PartBody` go through ``sender``; others to botocore's own HTTP stack."""
    from botocore.awsrequest import AWSResponse

    def before_send(request: Any, **_: Any) -> Any:
        body = request.body
        if not isinstance(body, PartBody):
            return None
        status, headers, data = sender.send(request.method, request.url, request.headers,
                                            body.view)
        return AWSResponse(request.url, status, headers, _Raw(data))

    return before_send


class SignedGets:
    """Small GETs (manifests, hints) signed here and sent by a :class:`BlockingSender`.

    Through a botocore client each GET costs about a millisecond of Python on the event
    loop (endpoint rules, the request pipeline, the response parser), so a listing of 1,000
    checkpoints was CPU-bound at over a second however many went at once. Here it is the
    signature and a small reply, in a worker thread. Only 200 and 404 replies are taken;
    anything else (a redirect to another region, a refusal) is for the caller to retry
    through botocore, which knows what to do with it.
    """

    def __init__(self, sender: BlockingSender, *, base_url: str, region: str) -> None:
        self.sender = sender
        self.base_url = base_url  # everything before the object key
        self.region = region

    def url_of(self, okey: str) -> str:
        return self.base_url + urllib.parse.quote(okey, safe="/~")

    def get(self, okey: str, access_key: str, secret_key: str,
            token: str | None) -> tuple[int, bytes]:
        """(status, body) of a GET of ``okey``; status 0 where botocore should handle it."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        url = self.url_of(okey)
        req = AWSRequest(method="GET", url=url, headers={})
        S3SigV4Auth(Credentials(access_key, secret_key, token), "s3", self.region).add_auth(req)
        status, _, body = self.sender.send("GET", url, req.headers, memoryview(b""))
        if status == 200 or (status == 404 and b"<Code>NoSuchKey</Code>" in body):
            return status, body
        return 0, b""

    def get_into(self, okey: str, access_key: str, secret_key: str, token: str | None, *,
                 fd: int, offset: int, length: int | None,
                 feed: Callable[[memoryview], None]) -> int | None:
        """GET bytes ``offset .. offset + length`` of ``okey`` (the whole object where
        ``length`` is None) into ``fd`` at ``offset``: one thread call, no event-loop
        iteration per 64 KiB. Returns the bytes written, or None where botocore should
        handle the request (any reply but 200/206). ``feed`` gets the bytes once written,
        from the same memory."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        url = self.url_of(okey)
        headers = {} if length is None else {"Range": f"bytes={offset}-{offset + length - 1}"}
        req = AWSRequest(method="GET", url=url, headers=headers)
        S3SigV4Auth(Credentials(access_key, secret_key, token), "s3", self.region).add_auth(req)
        written = -1

        def into(resp: http.client.HTTPResponse) -> None:
            nonlocal written
            size = int(resp.getheader("Content-Length") or -1)
            if size < 0 or (length is not None and size != length):
                raise http.client.HTTPException(
                    f"asked for {length} bytes at {offset}, the reply has {size}")
            if length is not None and size and offset % mmap.ALLOCATIONGRANULARITY == 0:
                # A range of a larger file: received straight into the file's pages (one
                # copy, no buffer to fill and write out), and hashed from them.
                os.posix_fallocate(fd, offset, size)  # grows the file, never shrinks it
                with mmap.mmap(fd, size, offset=offset) as mm:
                    view = memoryview(mm)
                    try:
                        _receive(resp, view)
                        feed(view)
                    finally:
                        view.release()
            else:
                view = memoryview(bytearray(size))
                _receive(resp, view)
                rest = view
                while rest:
                    n = os.pwrite(fd, rest, offset + (size - len(rest)))
                    rest = rest[n:]
                feed(view)
            written = size

        status, _, _ = self.sender.send("GET", url, req.headers, memoryview(b""), into=into)
        return written if status in (200, 206) and written >= 0 else None
