"""Slow and oversized requests are cut off by the server (behaviorlm.service.connections), issue 31 item 8.

A real uvicorn server on 127.0.0.1 with the options ``behaviorlm serve`` uses, a one-route app
that reads a JSON body (as every /v1 route does), and raw sockets that misbehave.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402

from behaviorlm.service.connections import GuardedHttpTools, set_limits  # noqa: E402
from behaviorlm.service.launch import ServeConfig, uvicorn_options  # noqa: E402

TIMEOUT = 1.0


@pytest.fixture(scope="module")
def server():
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"n": len(await request.json())}

    config = ServeConfig(model="unused", read_timeout=TIMEOUT, max_header_bytes=4096)
    set_limits(config.read_timeout, config.max_header_bytes)  # what ServeConfig.app() does in each worker
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", **uvicorn_options(config)))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield port
    srv.should_exit = True
    thread.join(timeout=10)
    set_limits()


def _exchange(port: int, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send ``data``, then read until the server closes; what came back and how long it took.
    The send buffer is small, as on a real network, so that a large request is still being sent
    when the server answers (the loopback's default buffers would take megabytes at once)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        s.settimeout(wait)
        s.connect(("127.0.0.1", port))
        t0 = time.monotonic()
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return got, time.monotonic() - t0


def _post(body: bytes, length: int | None = None, extra: bytes = b"") -> bytes:
    n = len(body) if length is None else length
    return (
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nconnection: close\r\n"
        + extra
        + b"content-length: %d\r\n\r\n" % n
        + body
    )


def test_the_server_uses_the_guarded_protocol():
    assert uvicorn_options(ServeConfig(model="m"))["http"] is GuardedHttpTools


def test_a_whole_request_is_answered(server):
    got, _ = _exchange(server, _post(b"[1, 2, 3]"))
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b'{"n":3}')


def test_a_body_shorter_than_its_content_length_is_cut_off(server):
    got, took = _exchange(server, _post(b"[1, 2", length=100))
    assert got.startswith(b"HTTP/1.1 408") and TIMEOUT <= took < TIMEOUT + 2


def test_unfinished_headers_are_cut_off(server):
    got, took = _exchange(server, b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-ty")
    assert got.startswith(b"HTTP/1.1 408") and TIMEOUT <= took < TIMEOUT + 2


def test_a_client_dripping_bytes_does_not_reset_the_clock(server):
    with socket.create_connection(("127.0.0.1", server), timeout=5) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /echo HTTP/1.1\r\n")
        got = b""
        for _ in range(30):  # one header byte every 0.1 s: each read would reset an idle timer
            try:
                s.sendall(b"x")
            except OSError:
                break
            time.sleep(0.1)
        try:
            got = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            pass
        assert got.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < TIMEOUT + 2.5


@pytest.mark.parametrize("size", [8 * 1024, 1024 * 1024])
def test_oversized_headers_are_refused(server, size):
    """One answer, 431, read by a client that is still sending (the server lingers instead of
    resetting the connection: ``sendall`` in ``_exchange`` would fail with a broken pipe). No
    timing bound: a 408 would be the timeout, and the megabyte's own sending time, client and
    server sharing one interpreter, is most of a second."""
    got, _ = _exchange(server, _post(b"[]", extra=b"x-big: " + b"a" * size + b"\r\n"))
    assert got.startswith(b"HTTP/1.1 431") and got.count(b"HTTP/1.1") == 1


def test_headers_within_the_limit_pass(server):
    got, _ = _exchange(server, _post(b"[]", extra=b"x-fine: " + b"a" * 2000 + b"\r\n"))
    assert got.startswith(b"HTTP/1.1 200")
