"""The ASGI side of a session's stream: response head, body chunks, disconnects, abort."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import anyio
from starlette.types import Receive, Scope, Send

from .errors import ErrorCode
from .events import encode_error
from .handler import Attachment, Closed, SessionHandler, Sink

ABORT_EXTENSION: Final = "mcp_sse_transport.abort"
"""Scope extension under which a server offers ``{"abort": callable}``: ``abort()`` drops the
connection at once, unflushed bytes discarded, and resets it (RST, the kernel's buffers freed)
when bytes are still queued that the peer did not take. It may also offer
``"set_send_buffer"``, a callable taking the bytes of the socket's kernel send buffer
(``SO_SNDBUF``). :mod:`mcp_sse_transport.serving` installs both for uvicorn."""

SSE_HEADERS: Final = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
)


def _offered(scope: Scope, name: str) -> Callable[..., object] | None:
    """The server's callable ``name`` of :data:`ABORT_EXTENSION`, if it offers one."""
    extension = scope.get("extensions", {}).get(ABORT_EXTENSION)
    return extension.get(name) if isinstance(extension, dict) else None


def header(scope: Scope, name: str) -> str | None:
    """The value of the request's header ``name`` (the first, if repeated), or ``None``."""
    key = name.lower().encode()
    for field, value in scope.get("headers", []):
        if field.lower() == key:
            return bytes(value).decode("latin-1")
    return None


def disconnected(receive: Receive) -> Closed:
    """Returns once the client has gone (``http.disconnect``)."""

    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return wait


async def open_stream(
    send: Send,
    scope: Scope | None = None,
    send_buffer: int | None = None,
    headers: Sequence[tuple[bytes, bytes]] = SSE_HEADERS,
) -> Sink:
    """Send the event stream's response head (``headers``); returns the sink that writes body
    chunks. First the socket's kernel send buffer is capped at
    ``send_buffer`` bytes (``SseConfig``'s ``socket_send_buffer``), where the server offers that
    in ``scope``."""
    if scope is not None and send_buffer is not None and (cap := _offered(scope, "set_send_buffer")) is not None:
        cap(send_buffer)
    await send({"type": "http.response.start", "status": 200, "headers": list(headers)})

    async def sink(chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    return sink


async def end_stream(scope: Scope, send: Send, graceful: bool, within: float) -> None:
    """Close the body with its terminating chunk; first drop the connection (aborted where the
    server offers that, and reset if the client left bytes unread) unless the end is
    ``graceful``, so a stuck client cannot hold it open."""
    if not graceful and (abort := _offered(scope, "abort")) is not None:
        abort()
    with anyio.move_on_after(within):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


REFUSED: Final = encode_error(ErrorCode.SUPERSEDED, "A later resume of this session took it over")
"""What a resume that lost its race gets before its stream ends: the session goes on elsewhere."""


async def write_within(sink: Sink, chunk: bytes, within: float) -> bool:
    """One write outside a session's writer (a refusal, a relay's replay): whether it was
    written within ``within`` seconds; a failed write counts as not written."""
    with anyio.move_on_after(within) as stalled:
        try:
            await sink(chunk)
        except Exception:
            return False
    return not stalled.cancelled_caught


async def stream_session(
    handler: SessionHandler,
    scope: Scope,
    receive: Receive,
    send: Send,
    preface: bytes,
    *,
    after: str | None = None,
    attachment: Attachment | None = None,
    sink: Sink | None = None,
    arrived: int | None = None,
    headers: Sequence[tuple[bytes, bytes]] = SSE_HEADERS,
) -> None:
    """Serve ``handler``'s events as this request's response until the connection drops or the
    session ends. A new session comes with its ``attachment``; a resume (``after`` a token)
    attaches here, superseding any connection still attached, unless a resume that arrived
    later (``arrived``: this one's claim sequence) claimed the session first: then this stream
    gets a ``SUPERSEDED`` error event and ends. ``sink`` continues a response whose head
    :func:`open_stream` already sent.
    """
    claim = handler.claim(arrived) if attachment is None else None  # the last resume to arrive wins
    if sink is None:
        sink = await open_stream(send, scope, handler.config.socket_send_buffer, headers)
    if claim is not None:
        attachment = await handler.attach_latest(claim)
        if attachment is None:  # a later resume of the session got there first
            graceful = await write_within(sink, REFUSED, handler.config.write_timeout)
            return await end_stream(scope, send, graceful, handler.config.write_timeout)
    graceful = await handler.run(
        sink, preface=preface, after=after, attachment=attachment, closed=disconnected(receive)
    )
    await end_stream(scope, send, graceful, handler.config.write_timeout)
