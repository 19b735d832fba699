"""The ASGI side of a session's stream: response head, body chunks, disconnects, abort."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import anyio
from starlette.types import Receive, Scope, Send

from .handler import Attachment, Closed, SessionHandler

ABORT_EXTENSION: Final = "mcp_sse_transport.abort"
"""Scope extension under which a server offers ``{"abort": callable}`` to drop a connection at
once (unflushed bytes discarded); :mod:`mcp_sse_transport.serving` installs it for uvicorn."""

SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]


def _aborter(scope: Scope) -> Callable[[], object] | None:
    extension = scope.get("extensions", {}).get(ABORT_EXTENSION)
    return extension.get("abort") if isinstance(extension, dict) else None


def _disconnected(receive: Receive) -> Closed:
    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return wait


async def stream_session(
    handler: SessionHandler,
    scope: Scope,
    receive: Receive,
    send: Send,
    preface: bytes,
    *,
    after: str | None = None,
    attachment: Attachment | None = None,
) -> None:
    """Serve ``handler``'s events as this request's response until the connection drops or the
    session ends. A new session comes with its ``attachment``; a resume (``after`` a token)
    attaches here, superseding any connection still attached.

    A graceful end closes the body with its terminating chunk; otherwise the connection is dropped
    (aborted where the server offers that) so a stuck client cannot hold it open.
    """
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

    async def sink(chunk: bytes) -> None:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})

    if attachment is None:
        while handler.attached:  # the last resume wins
            await handler.supersede()
        attachment = handler.attach()
    graceful = await handler.run(
        sink, preface=preface, after=after, attachment=attachment, closed=_disconnected(receive)
    )
    if not graceful and (abort := _aborter(scope)) is not None:
        abort()
    with anyio.move_on_after(handler.config.write_timeout):
        await send({"type": "http.response.body", "body": b"", "more_body": False})
