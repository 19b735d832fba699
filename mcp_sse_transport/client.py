"""A client transport that survives dropped connections: it resumes by ``Last-Event-ID``.

``resumable_sse_client(url)`` works wherever the SDK takes a transport (``Client(transport)``),
against this library's server and, without resumption, against any legacy SSE server.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urljoin, urlparse

import anyio
import anyio.abc

from ._sdk import (
    ContextSendStream,
    McpHttpClientFactory,
    Message,
    ReadStream,
    SessionMessage,
    WriteStream,
    create_context_streams,
    create_mcp_http_client,
    httpx,
    message_of,
    parse,
    request_within_origin,
    sender_context,
    session_message,
    sse_within_origin,
    types,
)
from .errors import ErrorCode

__all__ = ["resumable_sse_client"]

logger = logging.getLogger("mcp_sse_transport.client")

_SESSION_LOST = {ErrorCode.RESUME_UNKNOWN, ErrorCode.SLOW_CONSUMER}
"""Error events after which the session cannot continue on this client. ``SUPERSEDED`` is not
one: a resume of this client's that a server took up late (a worker that stalled between the
request and its turn) can win over the client's newer stream; the client resumes again, unless
it is superseded ``max_reconnects`` times in a row with no message between (another client)."""

_HANDSHAKE = {"initialize", "notifications/initialized"}
"""Messages POSTed in order: each one's POST settles before the next message is taken."""

_CANCELLED = "notifications/cancelled"


@dataclass
class _State:
    endpoint: str | None = None
    session: str = "(no session yet)"
    """The session id cut to 8 characters, for logs: a whole one is a bearer capability."""
    last_event_id: str | None = None
    retry: float = 1.0
    pending: set[types.RequestId] = field(default_factory=set)
    """Requests sent and not yet answered: they get an error if the session is lost."""
    fresh: bool = True
    """Nothing happened in the session yet: no POST was accepted, no message arrived. A server
    ends such a session (a probe) with its connection, so a resume finds it unknown; nothing is
    lost, and the client carries on in the new session the server opens on the same stream."""
    superseded: int = 0
    """Streams of this client superseded in a row, with no message between."""
    stale: bool = False
    """The fresh session is gone: the next ``endpoint`` event names the new one."""
    restarted: anyio.Event = field(default_factory=anyio.Event)
    """Set (then made anew) when the fresh session was replaced by a new one."""


@dataclass
class _InFlight:
    """A request's POST that has not settled yet (it may be being sent again): a cancel for the
    request stops it, then goes out."""

    request_id: types.RequestId
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


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
    auth: httpx.Auth | None = None,
    on_session_created: Callable[[str], None] | None = None,
    *,
    max_reconnects: int = 5,
    max_delay: float = 30.0,
    max_event_size: int | None = None,
    max_concurrent_posts: int = 16,
) -> AsyncIterator[tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]]:
    """Connect to a legacy SSE endpoint, as ``mcp.client.sse.sse_client`` does, and reconnect
    with ``Last-Event-ID`` whenever the stream drops, up to ``max_reconnects`` failed attempts in
    a row, waiting the server's ``retry:`` delay, doubled on each failure up to ``max_delay``.

    When the session cannot go on (the server no longer knows it, cut it loose as a slow
    consumer, or reconnecting failed), every request still waiting for an answer gets a
    JSON-RPC error whose code says why (``ErrorCode`` values, or -32000 connection closed), so the
    SDK's ``Client`` raises ``MCPError`` for it, and the read stream ends. Events of any size are
    accepted unless ``max_event_size`` is set; a message or error event that is not valid is
    logged and skipped.

    A POST answered 503 (not delivered: the server's store or the session's owner was
    unavailable for a moment) is sent again after the stream's ``retry:`` delay, doubled each
    time, up to ``max_reconnects`` times; so is a request answered 504 (its outcome unknown: a
    request id runs once per session). POSTs go out concurrently, up to
    ``max_concurrent_posts`` at a time (a further message waits for one to settle), so one
    request's retries hold back no other message. The handshake
    (``initialize``, then ``notifications/initialized``) is POSTed in order, and a
    ``notifications/cancelled`` takes no slot: when its request's POST has not settled yet, that
    POST is stopped first (its caller gave up on it), then the cancel is sent.
    """
    if max_concurrent_posts < 1:
        raise ValueError("max_concurrent_posts must be at least 1")
    state = _State()
    read_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, write_reader = create_context_streams[SessionMessage](0)

    async with httpx_client_factory(
        headers=headers, auth=auth, timeout=httpx.Timeout(timeout, read=sse_read_timeout)
    ) as client:

        def backoff(failures: int) -> float:
            """The wait before another try: the server's ``retry:``, doubled per failure after the first."""
            return min(max_delay, state.retry * 2.0 ** max(0, failures - 1))

        async def fail_pending(error: types.ErrorData) -> None:
            for request_id in sorted(state.pending, key=str):
                with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                    await read_writer.send(
                        session_message(types.JSONRPCError(jsonrpc="2.0", id=request_id, error=error))
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
                        try:
                            message = parse(event.data)
                        except ValueError as exc:  # pydantic's ValidationError is one
                            skip_malformed(event.event, event.data, exc)
                            continue
                        state.fresh = False
                        state.superseded = 0
                        if isinstance(message, types.JSONRPCResponse | types.JSONRPCError):
                            state.pending.discard(message.id)
                        await read_writer.send(session_message(message))
                    elif event.event == "error":
                        try:
                            error = types.ErrorData.model_validate(json.loads(event.data))
                        except ValueError as exc:  # json's JSONDecodeError, pydantic's ValidationError
                            skip_malformed(event.event, event.data, exc)
                            continue
                        if error.code == ErrorCode.RESUME_UNKNOWN and state.fresh:
                            logger.info("session %s ended before its first message; starting anew", state.session)
                            state.stale = True
                            continue
                        logger.warning("server error event %d: %s", error.code, error.message)
                        if error.code in _SESSION_LOST or (
                            error.code == ErrorCode.SUPERSEDED and state.superseded >= max_reconnects
                        ):
                            raise _SessionLost(error)
                        if error.code == ErrorCode.SUPERSEDED:
                            state.superseded += 1

        def skip_malformed(kind: str, data: str, exc: ValueError) -> None:
            """One line, without the event's id or data (either may carry the session id)."""
            reason = type(exc).__name__
            logger.warning(
                "skipped a malformed %s event (%s, %d characters) in session %s", kind, reason, len(data), state.session
            )

        async def reader(task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
            failures = 0
            try:
                while True:
                    connected = False

                    def on_endpoint(endpoint: str) -> None:
                        nonlocal connected
                        connected = True
                        if state.endpoint is None or state.stale:
                            first, state.endpoint, state.stale = state.endpoint is None, endpoint, False
                            session_id = parse_qs(urlparse(endpoint).query).get("session_id")
                            if session_id:
                                state.session = f"{session_id[0][:8]}…"
                            if on_session_created is not None and session_id:
                                on_session_created(session_id[0])
                            if first:
                                task_status.started(endpoint)
                            else:  # POSTs the lost fresh session refused go to this one
                                state.restarted.set()
                                state.restarted = anyio.Event()

                    try:
                        await read_one_connection(on_endpoint)
                    except _SessionLost as lost:
                        await fail_pending(lost.error)
                        return
                    except (httpx.HTTPError, anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
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

        async def refuse(message: Message, exc: Exception) -> None:
            """A POST refused, or never sent: no answer will come, so fail its request now."""
            status = f" {exc.response.status_code}" if isinstance(exc, httpx.HTTPStatusError) else ""
            logger.warning("POST failed (%s%s)", type(exc).__name__, status)
            if isinstance(message, types.JSONRPCRequest):
                state.pending.discard(message.id)
                error = types.ErrorData(code=types.CONNECTION_CLOSED, message="Could not send the request")
                await _deliver(read_writer, types.JSONRPCError(jsonrpc="2.0", id=message.id, error=error))

        async def new_session(endpoint: str, restarted: anyio.Event) -> bool:
            """Whether the fresh session POSTed to at ``endpoint`` was replaced by a new one, now or
            within ``max_delay`` (the reader is reconnecting): a 404 from it delivered nothing."""
            if state.endpoint != endpoint:
                return True
            with anyio.move_on_after(max_delay):
                await restarted.wait()
            return state.endpoint != endpoint

        async def post(message: Message) -> None:
            """POST one message. When its outcome is unknown (the connection dropped mid-request:
            it may have arrived), a message with an id is sent again, up to ``max_reconnects``
            times: the server accepts a request id once per session, so nothing runs twice."""
            assert state.endpoint is not None
            resend = getattr(message, "id", None) is not None
            unknown = False  # an attempt may have arrived
            for attempt in range(max_reconnects + 1):
                if attempt:
                    await anyio.sleep(backoff(attempt))
                endpoint, restarted = state.endpoint, state.restarted
                try:
                    response = await request_within_origin(
                        client,
                        "POST",
                        endpoint,
                        json=message.model_dump(by_alias=True, mode="json", exclude_unset=True),
                    )
                    if response.status_code == 504:  # the server itself cannot tell whether it arrived
                        logger.warning("POST outcome unknown (504)%s", "; sending it again" if resend else "")
                        if not resend:
                            return
                        unknown = True
                        continue
                    if response.status_code == 503 and attempt < max_reconnects:
                        # Unavailable now (its store, or its owner, for a moment): ask again later.
                        continue
                    if response.status_code == 404 and state.fresh and await new_session(endpoint, restarted):
                        return await post(message)  # never delivered: nothing happened in the old one
                    response.raise_for_status()
                    state.fresh = False
                    return
                except (httpx.ConnectError, httpx.ConnectTimeout, httpx.HTTPStatusError) as exc:
                    if not unknown:
                        return await refuse(message, exc)
                    if isinstance(exc, httpx.HTTPStatusError):  # the server's own answer: settled
                        return
                except httpx.HTTPError as exc:
                    again = "; sending it again" if resend else ""
                    logger.warning("POST outcome unknown (%s)%s", type(exc).__name__, again)
                    if not resend:
                        return
                    unknown = True
            # Still unknown: it may have arrived, so the request stays pending (the session's
            # end, or the caller's own timeout, fails it).

        slots = anyio.Semaphore(max_concurrent_posts)
        in_flight: dict[types.RequestId, _InFlight] = {}
        """Requests whose POST has not settled, by id."""

        async def post_in_slot(message: Message) -> None:
            """POST ``message`` in the slot the writer took for it; a request's POST can be stopped
            by a cancel for it until it settles."""
            record = in_flight.get(message.id) if isinstance(message, types.JSONRPCRequest) else None
            try:
                with record.scope if record is not None else nullcontext():
                    await post(message)
            finally:
                slots.release()
                if record is not None:
                    record.done.set()
                    if in_flight.get(record.request_id) is record:
                        del in_flight[record.request_id]

        async def post_cancel(message: types.JSONRPCNotification) -> None:
            """Stop the cancelled request's POST if it has not settled (it may be waiting to be sent
            again), then send the cancel: never ahead of its own request, behind no other one."""
            request_id = (message.params or {}).get("requestId")
            if isinstance(request_id, int | str):
                state.pending.discard(request_id)  # its caller no longer waits for it
                record = in_flight.get(request_id)
                if record is not None:
                    record.scope.cancel()
                    await record.done.wait()
            await post(message)

        async def post_writer() -> None:
            """Take each message the session writes, in order, and POST it: the handshake's one
            after the other, every other one in a task of its own once a slot is free (a cancel
            needs none). Each task runs in its sender's context (tracing), as the SDK's own does."""
            async with write_reader, anyio.create_task_group() as posts:
                async for item in write_reader:
                    message = message_of(item)
                    context = sender_context(write_reader) or contextvars.copy_context()
                    method = getattr(message, "method", None)
                    if isinstance(message, types.JSONRPCRequest):
                        state.pending.add(message.id)
                    if method in _HANDSHAKE:
                        async with anyio.create_task_group() as handshake:
                            context.run(handshake.start_soon, post, message)
                    elif method == _CANCELLED and isinstance(message, types.JSONRPCNotification):
                        context.run(posts.start_soon, post_cancel, message)
                    else:
                        await slots.acquire()
                        if isinstance(message, types.JSONRPCRequest):  # findable by a cancel from now on
                            in_flight[message.id] = _InFlight(message.id)
                        context.run(posts.start_soon, post_in_slot, message)

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


async def _deliver(read_writer: ContextSendStream[SessionMessage | Exception], message: Message) -> None:
    with suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
        await read_writer.send(session_message(message))
