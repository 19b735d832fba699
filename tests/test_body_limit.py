"""The request body limit this package brings for mcp 1.24 to 1.27 (``_sdk/_body_limit``), over a
real uvicorn and raw HTTP, with the SDK's answer: a declared length over the limit and a chunked
body that grows past it both get 413 "Request body too large", the app never called; a body
within it reaches the app whole, in one piece."""

from __future__ import annotations

import json

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_sse_transport._sdk._body_limit import DEFAULT_MAX_REQUEST_BODY_SIZE, RequestBodyLimitMiddleware

from ._support import serving

pytestmark = pytest.mark.anyio

LIMIT = 1000


async def _echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body, answers its length."""
    size = pieces = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        pieces += 1
        if not message.get("more_body", False):
            break
    body = json.dumps({"size": size, "pieces": pieces}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


async def _post(base: str, head: bytes, chunks: list[bytes]) -> tuple[int, bytes]:
    host, port = base.removeprefix("http://").split(":")
    async with await anyio.connect_tcp(host, int(port)) as stream:
        await stream.send(head)
        for chunk in chunks:
            await stream.send(chunk)
        data = b""
        with anyio.move_on_after(5):  # the server closes after its answer (Connection: close)
            while True:
                try:
                    data += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _limited(app: ASGIApp) -> Starlette:
    return Starlette(routes=[Mount("/", app=RequestBodyLimitMiddleware(app, LIMIT))])


def _head(extra: bytes) -> bytes:
    return b"POST /m HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + extra + b"\r\n"


def test_the_default_is_the_sdks() -> None:
    assert DEFAULT_MAX_REQUEST_BODY_SIZE == 4 * 1024 * 1024


async def test_a_declared_length_over_the_limit_gets_413_and_the_app_is_not_called() -> None:
    called = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.set()
        await _echo_length(scope, receive, send)

    with anyio.fail_after(20):
        async with serving(_limited(app)) as base:
            status, body = await _post(base, _head(b"Content-Length: %d\r\n" % (LIMIT + 1)), [b"x" * (LIMIT + 1)])
    assert status == 413
    assert body == b"Request body too large"
    assert not called.is_set()


async def test_a_chunked_body_past_the_limit_gets_413() -> None:
    chunks = [b"%x\r\n%s\r\n" % (600, b"x" * 600)] * 2 + [b"0\r\n\r\n"]
    with anyio.fail_after(20):
        async with serving(_limited(_echo_length)) as base:
            status, body = await _post(base, _head(b"Transfer-Encoding: chunked\r\n"), chunks)
    assert (status, body) == (413, b"Request body too large")


async def test_a_body_within_the_limit_reaches_the_app_whole() -> None:
    chunks = [b"%x\r\n%s\r\n" % (500, b"x" * 500)] * 2 + [b"0\r\n\r\n"]
    with anyio.fail_after(20):
        async with serving(_limited(_echo_length)) as base:
            status, body = await _post(base, _head(b"Transfer-Encoding: chunked\r\n"), chunks)
    assert status == 200
    assert json.loads(body) == {"size": LIMIT, "pieces": 1}


def test_it_is_the_adapters_limit_exactly_where_the_sdk_has_none() -> None:
    from mcp_sse_transport import _sdk
    from mcp_sse_transport._sdk import _body_limit

    major, minor = (int(part) for part in _sdk.VERSION.split(".")[:2])
    sdk_has_one = (major, minor) >= (1, 28)
    ours: object = _body_limit.RequestBodyLimitMiddleware
    assert (_sdk.RequestBodyLimitMiddleware is ours) is not sdk_has_one
