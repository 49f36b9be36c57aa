"""Read an HTTP reply from one of the blocking sender's connections, strictly.

``http.client`` parses the reply, but not through ``socket.makefile``: its ``SocketIO``
answers a receive timeout on a blocking socket (``SO_RCVTIMEO`` expiring is EAGAIN) with
"no data", which ``http.client`` takes for the end of the headers or of the body. A reply
that stalled after its status line then passed for a 200 with half its headers, or failed
with a ``TypeError``. It also takes the end of the stream for the end of the headers, so a
reply cut short after a header line looked complete. Here it reads from a source that
raises instead: a stall is a :class:`TimeoutError`, a head cut short is
:class:`HeadCutShort`, and a body shorter than its ``Content-Length`` (or a chunk line
cut short) is :class:`http.client.IncompleteRead`. The sender turns them into botocore's
``ReadTimeoutError``, ``ConnectionClosedError`` and ``IncompleteReadError``, which the
retry policy retries.
"""

from __future__ import annotations

import http.client
import io
import socket
from typing import Any

__all__ = ["HeadCutShort", "open_reply"]


class HeadCutShort(http.client.HTTPException):
    """The connection ended inside the reply's status line or headers."""


class _Wire(io.RawIOBase):
    """The receiving side of a connection; a receive timeout raises."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._sock.recv_into(buffer)
        except BlockingIOError as e:  # SO_RCVTIMEO expired on a blocking socket
            raise TimeoutError("no reply bytes within the read timeout") from e


class _Lines(io.BufferedReader):
    """Buffered reply bytes whose lines must end: one that does not was cut short. The end of
    the stream before the first byte is left to ``http.client`` (``RemoteDisconnected``: a
    kept-alive connection the server had closed)."""

    def __init__(self, raw: _Wire) -> None:
        super().__init__(raw)
        self._started = False

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        whole = line.endswith(b"\n") or (size is not None and 0 <= size <= len(line))
        if not whole and (line or self._started):
            raise http.client.IncompleteRead(line)
        self._started = True
        return line


class _Source:
    """What ``http.client.HTTPResponse`` takes for a socket: it only calls ``makefile``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def makefile(self, mode: str) -> _Lines:
        return _Lines(_Wire(self._sock))


def open_reply(sock: socket.socket, method: str) -> http.client.HTTPResponse:
    """A reply on ``sock`` whose status line and headers are read (``begin()`` done)."""
    resp = http.client.HTTPResponse(_Source(sock), method=method)  # type: ignore[arg-type]
    try:
        resp.begin()
    except http.client.IncompleteRead as e:
        resp.close()
        raise HeadCutShort(f"the reply ended inside its head, in a line of {len(e.partial)} "
                           "bytes") from e
    except BaseException:
        resp.close()
        raise
    return resp
