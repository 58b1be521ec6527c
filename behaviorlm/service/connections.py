"""Connection limits the HTTP server itself does not set: slow clients and oversized headers.

uvicorn's httptools protocol has an idle keep-alive timeout but no deadline for a request in
progress: a client that sends half its headers, or a body shorter than its Content-Length, holds
a connection (and, for the body, a waiting request handler) for as long as it keeps the socket
open, and headers of any size are accepted. That is how a handful of slow clients exhaust a
server (slowloris). :class:`GuardedHttpTools` adds what nginx calls ``client_header_timeout`` /
``client_body_timeout`` and ``large_client_header_buffers``:

* a **read deadline** per request, from its first byte to its last (headers and body): past it
  the client gets ``408 Request Timeout`` (if no response has started) and the connection closes;
* a **header size limit** (request line and header fields together): past it, ``431 Request
  Header Fields Too Large``, before the rest is parsed. The connection then closes the way
  nginx's ``lingering_close`` does: the server stops writing, and reads and drops what the
  client is still sending for at most :data:`LINGER_S` seconds and :data:`LINGER_BYTES` bytes.
  Closing at once, with the client's unread bytes in the server's buffer, makes the kernel reset
  the connection: a client still sending its headers would see "connection reset" or "broken
  pipe" instead of the 431 (a 1 MiB header did, in CI).

The deadline costs a request two attribute writes: a request notes when its first byte came,
and one sweep per event loop (every quarter of the timeout, at most a second, while there are
connections) closes those past it -- a timer per request cost ~7 us each, measured (RESULTS.md
section 22). A deadline therefore fires between ``read_timeout`` and ``read_timeout`` plus one
sweep period.

The limits are class attributes set once per process (:func:`set_limits`), because uvicorn
builds one protocol object per connection from the class it is given, and each ``--workers``
process imports the class anew.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

READ_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 16 * 1024
LINGER_S = 2.0
LINGER_BYTES = 4 * 1024 * 1024

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def set_limits(read_timeout: float = READ_TIMEOUT_S, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
    """The limits every connection of this process gets from now on."""
    GuardedHttpTools.read_timeout = float(read_timeout)
    GuardedHttpTools.max_header_bytes = int(max_header_bytes)


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a per-request read deadline and a header size limit."""

    read_timeout: float = READ_TIMEOUT_S
    max_header_bytes: int = MAX_HEADER_BYTES

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - uvicorn's signature
        super().__init__(*args, **kwargs)
        self._started: float | None = None  # loop time of the first byte of the request being read
        self._in_head = False
        self._head_bytes = 0
        self._refused = False  # answered 408/431: nothing more of this connection is parsed
        self._linger_left = LINGER_BYTES  # what may still be dropped while lingering after a 431

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _sweep_soon(self.loop, self.connections, min(1.0, self.read_timeout / 4))

    def data_received(self, data: bytes) -> None:
        if self._refused:  # lingering after a 431: what the client still sends is dropped
            self._linger_left -= len(data)
            if self._linger_left < 0:
                self.transport.close()
            return
        if self._started is None:  # the first byte of a request: its clock starts
            self._started = self.loop.time()
            self._in_head, self._head_bytes = True, 0
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_header_bytes:
            self._refuse(431, f"request headers over {self.max_header_bytes} bytes")

    # The parser goes on through the rest of a read after a refusal; from then on its callbacks
    # (a body, the end of the message, a pipelined request) and its own 400 are ignored.

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.max_header_bytes:  # arrived in one read: counted here instead
            self._refuse(431, f"request headers over {self.max_header_bytes} bytes")
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        if not self._refused:
            super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:
            super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        self._started = None

    def overdue(self, now: float) -> bool:
        return self._started is not None and now - self._started > self.read_timeout

    def too_slow(self) -> None:
        self._refuse(408, f"request not received within {self.read_timeout:g} s")

    def _refuse(self, status: int, why: str) -> None:
        """Answer ``status`` unless a response has started, and close the connection; a request
        handler waiting for the rest of the body sees the client as disconnected. Oversized
        headers (431) close lingering, since that client is still sending."""
        self._disarm()
        if self.transport.is_closing() or self._refused:
            return
        self._refused = True
        self.logger.warning("closing a connection from %s: %s", self.client, why)
        if self.cycle is None or not self.cycle.response_started:
            body = why.encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
            )
        if status == 431 and self.transport.can_write_eof():
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        """Stop writing (the client reads the answer, then end of stream) and drop what the client
        still sends, until it closes (``eof_received`` closes the transport), :data:`LINGER_BYTES`
        are dropped, or :data:`LINGER_S` pass."""
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


#: The event loops whose sweep is scheduled, by id; the loop is held so that its id cannot be
#: reused by a new loop while it is here (a loop closed with a sweep pending stays, harmlessly).
_SWEEPING: dict[int, Any] = {}


def _sweep_soon(loop: Any, connections: set, period: float) -> None:
    """Schedule the sweep of this loop's connections, unless it is scheduled already."""
    if id(loop) not in _SWEEPING:
        _SWEEPING[id(loop)] = loop
        loop.call_later(period, _sweep, loop, connections, period)


def _sweep(loop: Any, connections: set, period: float) -> None:
    """Close every connection whose request is past its deadline; again after ``period`` while
    there are connections (the next connection schedules it anew otherwise)."""
    now = loop.time()
    for conn in list(connections):
        if isinstance(conn, GuardedHttpTools) and conn.overdue(now):
            conn.too_slow()
    if connections and not loop.is_closed():
        loop.call_later(period, _sweep, loop, connections, period)
    else:
        _SWEEPING.pop(id(loop), None)
