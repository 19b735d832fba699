"""A client transport that survives dropped connections: it resumes by ``Last-Event-ID``.

``resumable_sse_client(url)`` works wherever the SDK takes a transport (``Client(transport)``),
against this library's server and, without resumption, against any legacy SSE server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urljoin, urlparse

import anyio
import anyio.abc
import httpx2
import mcp_types as types
from mcp.shared._context_streams import ContextSendStream, create_context_streams
from mcp.shared._httpx_utils import (
    McpHttpClientFactory,
    create_mcp_http_client,
    request_within_origin,
    sse_within_origin,
)
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import SessionMessage

from .errors import ErrorCode

__all__ = ["resumable_sse_client"]

logger = logging.getLogger("mcp_sse_transport.client")

_SESSION_LOST = {ErrorCode.RESUME_UNKNOWN, ErrorCode.SLOW_CONSUMER, ErrorCode.SUPERSEDED}
"""Error events after which the session cannot continue on this client."""


@dataclass
class _State:
    endpoint: str | None = None
    last_event_id: str | None = None
    retry: float = 1.0
    pending: set[types.RequestId] = field(default_factory=set)
    """Requests sent and not yet answered: they get an error if the session is lost."""


class _SessionLost(Exception):
    def __init__(self, error: types.ErrorData) -> None:
        super().__init__(error.message)
        self.error = error


@asynccontextmanager
async def resumable_sse_client(
    url: str,
    headers: dict[str, Any] | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 (the SDK's sse_client signature)
    sse_read_timeout: float = 300.0,
    httpx_client_factory: McpHttpClientFactory = create_mcp_http_client,
    auth: httpx2.Auth | None = None,
    on_session_created: Callable[[str], None] | None = None,
    *,
    max_reconnects: int = 5,
    max_delay: float = 30.0,
    max_event_size: int | None = None,
) -> AsyncIterator[tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]]:
    """Connect to a legacy SSE endpoint, as ``mcp.client.sse.sse_client`` does, and reconnect
    with ``Last-Event-ID`` whenever the stream drops, up to ``max_reconnects`` failed attempts in
    a row, waiting the server's ``retry:`` delay, doubled on each failure up to ``max_delay``.

    When the session cannot go on (the server no longer knows it, cut it loose as a slow
    consumer, or reconnecting failed), every request still waiting for an answer gets a
    JSON-RPC error whose code says why (``ErrorCode`` values, or -32000 connection closed), so the
    SDK's ``Client`` raises ``MCPError`` for it, and the read stream ends. Events of any size are
    accepted unless ``max_event_size`` is set.
    """
    state = _State()
    read_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, write_reader = create_context_streams[SessionMessage](0)

    async with httpx_client_factory(
        headers=headers, auth=auth, timeout=httpx2.Timeout(timeout, read=sse_read_timeout)
    ) as client:

        def backoff(failures: int) -> float:
            """The wait before another try: the server's ``retry:``, doubled per failure after the first."""
            return min(max_delay, state.retry * 2.0 ** max(0, failures - 1))

        async def fail_pending(error: types.ErrorData) -> None:
            for request_id in sorted(state.pending, key=str):
                with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                    await read_writer.send(
                        SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=request_id, error=error))
                    )
            state.pending.clear()

        async def read_one_connection(on_endpoint: Callable[[str], None]) -> None:
            """Read events until this connection ends; raises _SessionLost when the session is gone."""
            resume = {"Last-Event-ID": state.last_event_id} if state.last_event_id else None
            async with sse_within_origin(client, url, headers=resume, max_event_size=max_event_size) as source:
                source.response.raise_for_status()
                async for event in source:
                    if event.retry is not None:
                        state.retry = event.retry / 1000
                    if event.id:
                        state.last_event_id = event.id
                    if event.event == "endpoint":
                        endpoint = urljoin(url, event.data)
                        if urlparse(endpoint)[:2] != urlparse(url)[:2]:
                            raise ValueError(f"Endpoint origin does not match connection origin: {endpoint}")
                        on_endpoint(endpoint)
                    elif event.event == "message" and event.data:
                        message = types.jsonrpc_message_adapter.validate_json(event.data, by_name=False)
                        if isinstance(message, types.JSONRPCResponse | types.JSONRPCError):
                            state.pending.discard(message.id)
                        await read_writer.send(SessionMessage(message))
                    elif event.event == "error":
                        error = types.ErrorData.model_validate(json.loads(event.data))
                        logger.warning("server error event %d: %s", error.code, error.message)
                        if error.code in _SESSION_LOST:
                            raise _SessionLost(error)

        async def reader(task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
            failures = 0
            try:
                while True:
                    connected = False

                    def on_endpoint(endpoint: str) -> None:
                        nonlocal connected
                        connected = True
                        if state.endpoint is None:
                            state.endpoint = endpoint
                            session_id = parse_qs(urlparse(endpoint).query).get("session_id")
                            if on_session_created is not None and session_id:
                                on_session_created(session_id[0])
                            task_status.started(endpoint)

                    try:
                        await read_one_connection(on_endpoint)
                    except _SessionLost as lost:
                        await fail_pending(lost.error)
                        return
                    except (httpx2.HTTPError, anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
                        if state.endpoint is None:
                            raise  # never connected: fail as the SDK's client does
                        logger.info("SSE stream dropped (%s); resuming", type(exc).__name__)
                    failures = 0 if connected else failures + 1
                    if failures > max_reconnects:
                        await fail_pending(types.ErrorData(code=types.CONNECTION_CLOSED, message="Connection closed"))
                        return
                    await anyio.sleep(backoff(failures))
            finally:
                read_writer.close()

        async def refuse(message: types.JSONRPCMessage, exc: Exception) -> None:
            """A POST refused, or never sent: no answer will come, so fail its request now."""
            logger.warning("POST failed (%s)", type(exc).__name__)
            if isinstance(message, types.JSONRPCRequest):
                state.pending.discard(message.id)
                error = types.ErrorData(code=types.CONNECTION_CLOSED, message="Could not send the request")
                await _deliver(read_writer, types.JSONRPCError(jsonrpc="2.0", id=message.id, error=error))

        async def post(message: types.JSONRPCMessage) -> None:
            """POST one message. When its outcome is unknown (the connection dropped mid-request:
            it may have arrived), a message with an id is sent again, up to ``max_reconnects``
            times: the server accepts a request id once per session, so nothing runs twice."""
            assert state.endpoint is not None
            resend = getattr(message, "id", None) is not None
            unknown = False  # an attempt may have arrived
            for attempt in range(max_reconnects + 1):
                if attempt:
                    await anyio.sleep(backoff(attempt))
                try:
                    response = await request_within_origin(
                        client,
                        "POST",
                        state.endpoint,
                        json=message.model_dump(by_alias=True, mode="json", exclude_unset=True),
                    )
                    if unknown and response.status_code == 503:  # unavailable now: ask again later
                        continue
                    response.raise_for_status()
                    return
                except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.HTTPStatusError) as exc:
                    if not unknown:
                        return await refuse(message, exc)
                    if isinstance(exc, httpx2.HTTPStatusError):  # the server's own answer: settled
                        return
                except httpx2.HTTPError as exc:
                    again = "; sending it again" if resend else ""
                    logger.warning("POST outcome unknown (%s)%s", type(exc).__name__, again)
                    if not resend:
                        return
                    unknown = True
            # Still unknown: it may have arrived, so the request stays pending (the session's
            # end, or the caller's own timeout, fails it).

        async def post_writer() -> None:
            async with write_reader:
                async for session_message in write_reader:
                    message = session_message.message
                    if isinstance(message, types.JSONRPCRequest):
                        state.pending.add(message.id)
                    await post(message)

        try:
            async with anyio.create_task_group() as tg:
                await tg.start(reader)
                tg.start_soon(post_writer)
                try:
                    yield read_stream, write_stream
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Never connected: raise what the first connection raised, as the SDK's client does.
            if state.endpoint is None and len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise


async def _deliver(read_writer: ContextSendStream[SessionMessage | Exception], message: types.JSONRPCMessage) -> None:
    with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
        await read_writer.send(SessionMessage(message))
