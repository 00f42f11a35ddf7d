"""The clerk's page server on a real socket: what it refuses, and how (edge.statuspage).

The pages themselves (GET /, /metrics, /status.json from a live box) are read by the browser
tests; here the requests that never reach a page.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from edge import statuspage


async def _exchange(request: bytes, *, close_write: bool = False) -> bytes:
    server = await asyncio.start_server(statuspage.StatusServer(cast(Any, None)).handle, "127.0.0.1", 0,
                                        limit=statuspage.MAX_REQUEST_HEAD)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        if close_write:
            writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 15)
        writer.close()
        return answer
    finally:
        server.close()


@pytest.mark.parametrize(("request_line", "status"), [
    (b"GET /nowhere HTTP/1.1", b"404 Not Found"),
    (b"POST / HTTP/1.1", b"405 Method Not Allowed"),
    (b"GET / SMTP/1.0", b"400 Bad Request"),
    (b"GET", b"400 Bad Request"),
    (b"GET http://elsewhere/ HTTP/1.1", b"400 Bad Request"),
    (b"GET /\xff HTTP/1.1", b"400 Bad Request"),
])
async def test_refused_requests_get_a_status_and_a_closed_connection(request_line: bytes,
                                                                     status: bytes) -> None:
    answer = await _exchange(request_line + b"\r\nHost: box\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert b"\r\nConnection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    if status.startswith(b"405"):
        assert b"\r\nAllow: GET, HEAD" in head


async def test_head_of_an_unknown_page_has_no_body() -> None:
    answer = await _exchange(b"HEAD /nowhere HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ") and answer.endswith(b"\r\n\r\n")


async def test_an_oversized_request_head_is_refused() -> None:
    answer = await _exchange(b"GET / HTTP/1.1\r\nX-Junk: " + b"a" * (2 * statuspage.MAX_REQUEST_HEAD))
    assert answer.startswith(b"HTTP/1.1 431 ")


async def test_a_request_cut_short_is_dropped_without_an_answer() -> None:
    assert await _exchange(b"GET / HTTP/1.1\r\nHost:", close_write=True) == b""


def test_request_line_parsing() -> None:
    assert statuspage.parse_request_line(b"GET /?lang=en&lang=vi HTTP/1.1\r\n\r\n") == (
        "GET", "/", {"lang": ["en", "vi"]})
    assert statuspage.parse_request_line(b"GET /metrics HTTP/1.0\r\n\r\n") == ("GET", "/metrics", {})
