"""A response the SDK's own code writes, put through a flow-controlled stream.

The SDK keeps serving what has no session for us to hold: protocol 2026-07-28's single-exchange
POSTs (``subscriptions/listen`` among them) and stateless mode. Their event streams still get
this library's limits: each body chunk the SDK sends takes a grant on a bounded buffer (the SDK's
producer waits for room, and a consumer too slow for ``grant_timeout`` is cut loose with
``SLOW_CONSUMER``), every write has ``write_timeout``, and idle streams get heartbeats. The
SDK's semantics stay its own: a broken stream loses its request, as the SDK says.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from uuid import uuid4

import anyio
import anyio.abc
from starlette.types import Message, Scope, Send

from ._asgi import end_stream
from .config import SseConfig
from .handler import Attachment, SessionHandler
from .replay import RAW
from .store import Unstored

__all__ = ["bounded_response"]

logger = logging.getLogger("mcp_sse_transport")

_BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError)
"""What a producer gets from a stream that was cut loose, or whose connection is gone."""


def _broken(exc: BaseException) -> bool:
    """Whether ``exc`` is a broken or closed stream's error, alone or all of a group (the SDK's
    code sends from inside a task group of its own)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_broken(inner) for inner in exc.exceptions)
    return isinstance(exc, _BROKEN)


def _is_event_stream(message: Message) -> bool:
    for name, value in message.get("headers", []):
        if name.lower() == b"content-type":
            return bytes(value).split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


class _Bounded:
    """The ``send`` handed to the SDK: an event stream's body goes through a session handler."""

    def __init__(self, scope: Scope, send: Send, config: SseConfig, task_group: anyio.abc.TaskGroup) -> None:
        self._scope = scope
        self._send = send
        # No grace: nobody resumes this stream, so a dropped connection ends it at once.
        self._config = replace(config, session_grace=0)
        self._task_group = task_group
        self.handler: SessionHandler | None = None
        self.written = anyio.Event()
        self.dropped = False

    async def __call__(self, message: Message) -> None:
        handler = self.handler
        if self.dropped:
            return  # the connection was dropped: what the SDK still sends goes nowhere
        if handler is None:
            with anyio.move_on_after(self._config.write_timeout) as stalled:  # a JSON answer, or the head
                await self._send(message)
            if stalled.cancelled_caught:
                logger.info("a response stalled for %g s; its connection is dropped", self._config.write_timeout)
                self.dropped = True
                await end_stream(self._scope, self._send, False, self._config.write_timeout)
                return
            if message["type"] == "http.response.start" and _is_event_stream(message):
                self.handler = SessionHandler(uuid4().hex, self._config, Unstored())
                self._task_group.start_soon(self._write, self.handler, self.handler.attach())
            return
        if message["type"] != "http.response.body":
            return
        body = message.get("body", b"")
        if body:
            await handler.send(body, event=RAW)
        if not message.get("more_body", False):
            await handler.close()

    async def _write(self, handler: SessionHandler, attachment: Attachment) -> None:
        """Write the stream to the connection until it ends; then end the response."""
        send = self._send

        async def sink(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        try:
            graceful = await handler.run(sink, attachment=attachment)
            await end_stream(self._scope, send, graceful, self._config.write_timeout)
        finally:
            self.written.set()


@asynccontextmanager
async def bounded_response(scope: Scope, send: Send, config: SseConfig) -> AsyncIterator[Send]:
    """A ``send`` for SDK code answering one request: pass it to the SDK's handler inside the
    block. A JSON answer passes through under ``write_timeout``; an event stream is written by
    a session handler of its own. The stream's own failures (cut loose, connection lost) end
    the SDK's handler and are not raised: the stream's final event says what happened. A JSON
    answer that stalls past ``write_timeout`` has its connection dropped."""
    async with anyio.create_task_group() as tg:
        bounded = _Bounded(scope, send, config, tg)
        try:
            yield bounded
        except Exception as exc:
            if bounded.handler is None or not bounded.handler.failed or not _broken(exc):
                raise
            logger.info("a response stream ended early (%s)", bounded.handler.failure)
        finally:
            handler = bounded.handler
            if handler is not None:
                if not handler.ended:
                    handler.abort("the response's own code stopped")
                with anyio.CancelScope(shield=True):
                    await bounded.written.wait()
