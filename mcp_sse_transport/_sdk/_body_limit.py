"""The request body limit for mcp 1.24 to 1.27, which have none (1.28 and 2.x have
``RequestBodyLimitMiddleware``, used in its place): the same constructor, default and answer,
and like it the whole body is read before the app runs (the front ends count on it: a POST is
parsed and handed over only once it has all arrived). Unlike it, a client that leaves mid-body
hands the app its disconnect alone, without the part of the body that came."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_REQUEST_BODY_SIZE = 4 * 1024 * 1024
"""4 MiB, the SDK's own default from 1.28 on."""


class RequestBodyLimitMiddleware:
    """Answers 413 "Request body too large" to a request whose ``Content-Length``, or whose body
    as it arrives, is over ``max_body_size`` bytes; else runs the app on the body read whole."""

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_size:
            return await _too_large(scope, receive, send)
        body = bytearray()
        pending: list[Message] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the app hears it
                pending.append(message)
                break
            body += message.get("body", b"")
            if len(body) > self.max_body_size:
                return await _too_large(scope, receive, send)
            if not message.get("more_body", False):
                pending.insert(0, {"type": "http.request", "body": bytes(body), "more_body": False})
                break

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)


async def _too_large(scope: Scope, receive: Receive, send: Send) -> None:
    await Response("Request body too large", status_code=413)(scope, receive, send)
