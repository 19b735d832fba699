"""The drop-in for ``mcp.server.sse.SseServerTransport``, with a flow-controlled session handler."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from urllib.parse import quote
from uuid import UUID, uuid4

import anyio
import anyio.abc
import mcp_types as types
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, AuthorizationContext, authorization_context
from mcp.server.transport_security import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    RequestBodyLimitMiddleware,
    TransportSecurityMiddleware,
    TransportSecuritySettings,
)
from mcp.shared._context_streams import ContextSendStream, create_context_streams
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._asgi import SSE_HEADERS, stream_session
from .config import SseConfig
from .errors import ErrorCode
from .events import encode_error, encode_event, error_body
from .handler import SessionHandler, session_tag
from .ids import format_event_id, parse_event_id
from .registry import RegistryStatistics, SessionRegistry
from .store import BEFORE_FIRST, EventStore, InMemoryEventStore

__all__ = ["RequestRejected", "SseServerTransport"]

logger = logging.getLogger("mcp_sse_transport")

_Inbound = ContextSendStream[SessionMessage | Exception]
_CLOSED = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)


class RequestRejected(ValueError):
    """``connect_sse`` refused the request and already answered it (a ValueError, as in stock)."""


@dataclass(slots=True)
class _Session:
    handler: SessionHandler
    inbound: _Inbound
    owner: AuthorizationContext | None


def _ended_streams() -> tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]:
    """Streams for a ``Server.run`` that has nothing to serve: reads end, writes are refused."""
    inbound, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, outbound = create_context_streams[SessionMessage](0)
    inbound.close()
    outbound.close()
    return read_stream, write_stream


def _owner(scope: Scope) -> AuthorizationContext | None:
    user = scope.get("user")
    return authorization_context(user) if isinstance(user, AuthenticatedUser) else None


class _ServerWriteStream:
    """The write stream the SDK server writes to: each message becomes one granted event."""

    __slots__ = ("_session", "_task_group")

    def __init__(self, session: _Session, task_group: anyio.abc.TaskGroup) -> None:
        self._session = session
        self._task_group = task_group

    async def send(self, item: SessionMessage, /) -> None:
        message = item.message
        try:
            # Bytes straight from pydantic-core: what model_dump_json does, without the str round trip.
            data = message.__pydantic_serializer__.to_json(message, by_alias=True, exclude_unset=True)
        except (ValueError, TypeError) as exc:  # PydanticSerializationError is a ValueError
            await _report_unserializable(self._session, self._task_group, message, exc)
            return
        await self._session.handler.send(data)

    async def aclose(self) -> None:
        await self._session.handler.close()

    async def __aenter__(self) -> _ServerWriteStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _jsonrpc_error(
    request_id: types.RequestId, message: str, code: int = ErrorCode.INTERNAL_ERROR
) -> types.JSONRPCError:
    return types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))


def _dump(message: types.JSONRPCMessage) -> str:
    return message.model_dump_json(by_alias=True, exclude_unset=True)


async def _answer_locally(session: _Session, answer: types.JSONRPCError) -> None:
    """Hand the server an answer to its own request, from a task of its own: the server may be
    reading in the very task that wrote the request. Dropped if it stops reading."""
    with anyio.move_on_after(session.handler.config.grant_timeout), suppress(*_CLOSED):
        await session.inbound.send(SessionMessage(answer))


async def _report_unserializable(
    session: _Session, task_group: anyio.abc.TaskGroup, message: types.JSONRPCMessage, exc: Exception
) -> None:
    """Tell the client which message was lost, and answer whoever waits for it, on either side."""
    handler = session.handler
    request_id = getattr(message, "id", None)
    method = getattr(message, "method", None)
    logger.error(
        "session %s: outbound %s could not be serialized (%s); the session goes on",
        handler.tag,
        type(message).__name__,
        type(exc).__name__,
        exc_info=exc,
    )
    details = {key: value for key, value in (("id", request_id), ("method", method)) if value is not None}
    try:
        await handler.send(
            error_body(ErrorCode.INTERNAL_ERROR, "Outbound message could not be serialized", details or None),
            event="error",
        )
        if isinstance(message, types.JSONRPCResponse):
            await handler.send(_dump(_jsonrpc_error(message.id, "Response could not be serialized")))
        elif isinstance(message, types.JSONRPCError):
            replacement = types.ErrorData(code=message.error.code, message=message.error.message)
            await handler.send(_dump(types.JSONRPCError(jsonrpc="2.0", id=message.id, error=replacement)))
        elif isinstance(message, types.JSONRPCRequest):
            # The server awaits the client's answer to a request the client never got: answer it.
            task_group.start_soon(
                _answer_locally, session, _jsonrpc_error(message.id, "Request could not be serialized")
            )
    except _CLOSED:
        logger.debug("session %s: ended before the serialization error could be reported", handler.tag)


def _id_of(body: bytes) -> types.RequestId | None:
    """The JSON-RPC id of a POSTed body that is JSON but not a valid message, if it names one."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or "method" not in parsed:
        return None
    request_id = parsed.get("id")
    return request_id if isinstance(request_id, str | int) and not isinstance(request_id, bool) else None


class SseServerTransport:
    """SSE server transport for MCP, a drop-in for ``mcp.server.sse.SseServerTransport``.

    ``connect_sse`` serves the GET stream and yields the SDK server's streams;
    ``handle_post_message`` is the ASGI app for the POST endpoint. Same constructor, statuses,
    texts and wire format as the stock class; underneath, each session's events go through a
    :class:`~mcp_sse_transport.handler.SessionHandler` configured by ``config``.
    """

    def __init__(
        self,
        endpoint: str,
        security_settings: TransportSecuritySettings | None = None,
        max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
        *,
        config: SseConfig | None = None,
        event_store: EventStore | None = None,
    ) -> None:
        """``endpoint`` is the relative path clients POST to, e.g. ``"/messages/"``.

        Raises ValueError for a full URL (``://``, a leading ``//``, ``?`` or ``#``) and for a
        non-positive ``max_request_body_size``, as the stock class does.
        """
        if max_request_body_size <= 0:
            raise ValueError("max_request_body_size must be a positive number of bytes")
        if "://" in endpoint or endpoint.startswith("//") or "?" in endpoint or "#" in endpoint:
            raise ValueError(
                f"Given endpoint: {endpoint} is not a relative path (e.g., '/messages/'), "
                "expecting a relative path (e.g., '/messages/')."
            )
        if not endpoint.startswith("/"):
            endpoint = "/" + endpoint
        self._endpoint = endpoint
        self._config = config or SseConfig()
        self._security = TransportSecurityMiddleware(security_settings)
        self._post_message_app = RequestBodyLimitMiddleware(self._handle_post_message, max_request_body_size)
        self._registry: SessionRegistry[_Session] = SessionRegistry()
        self._store: EventStore = (
            event_store
            if event_store is not None
            else InMemoryEventStore(
                max_events=self._config.replay_max_events,
                max_bytes=self._config.replay_max_bytes,
                max_age=self._config.replay_max_age,
            )
        )

    @property
    def config(self) -> SseConfig:
        return self._config

    @property
    def _read_stream_writers(self) -> dict[UUID, _Inbound]:
        """The stock class's session map, for code that inspects it: open sessions by UUID."""
        return {UUID(hex=session_id): session.inbound for session_id, session in self._registry.items()}

    def statistics(self) -> RegistryStatistics:
        """A snapshot of every open session's stream."""
        return self._registry.statistics()

    async def shutdown(self) -> None:
        """Refuse new sessions, then drain every open stream within ``drain_timeout`` and end it
        with an ``event: error`` (code ``SERVER_SHUTDOWN``) carrying a ``retry:`` hint."""
        logger.info("shutting down %d SSE session(s)", len(self._registry))
        await self._registry.shutdown()

    @asynccontextmanager
    async def connect_sse(
        self, scope: Scope, receive: Receive, send: Send
    ) -> AsyncIterator[tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]]:
        """Serve this GET's event stream and yield ``(read_stream, write_stream)`` for ``Server.run``.

        A GET with ``Last-Event-ID`` (header, or the ``last_event_id`` query parameter) resumes
        that session: the session's server is already running, so the yielded streams are at end
        of stream and ``Server.run`` returns at once, while the stream is served until it ends.
        Raises ValueError (:class:`RequestRejected`), after answering the request itself, when it
        fails the Host/Origin checks (421/403), arrives during shutdown (503), or would open a
        session past ``max_sessions`` (503).
        """
        if scope["type"] != "http":
            raise ValueError("connect_sse can only handle HTTP requests")
        request = Request(scope, receive)
        error_response = await self._security.validate_request(request, is_post=False)
        if error_response is None and self._registry.shutting_down:
            error_response = self._unavailable("Server shutting down")
        if error_response is not None:
            await error_response(scope, receive, send)
            raise RequestRejected("Request validation failed")
        last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        del request  # held for the session's whole life otherwise

        if scope["method"] == "HEAD":
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            yield _ended_streams()
            return

        preface = b""
        if last_event_id:
            resumed = await self._find_resumable(last_event_id, scope)
            if resumed is not None:
                session, token = resumed
                async with anyio.create_task_group() as tg:
                    preface = self._endpoint_event(scope, session, first=False)
                    tg.start_soon(partial(stream_session, session.handler, scope, receive, send, preface, after=token))
                    yield _ended_streams()
                return
            logger.info("resume refused: Last-Event-ID names no resumable session")
            preface = encode_error(ErrorCode.RESUME_UNKNOWN, "Unknown or expired Last-Event-ID; a new session starts")

        limit = self._config.max_sessions
        if limit is not None and len(self._registry) >= limit:
            logger.warning("refused a session: %d open, the limit", limit)
            await self._unavailable("Too many open sessions")(scope, receive, send)
            raise RequestRejected("Too many open sessions")

        session_id = uuid4().hex
        inbound, read_stream = create_context_streams[SessionMessage | Exception](0)
        session = _Session(SessionHandler(session_id, self._config, self._store), inbound, _owner(scope))
        self._registry.add(session_id, session)
        logger.debug("session %s opened", session.handler.tag)
        # Attached before the server can write, so nothing it writes is taken for a detached session.
        attachment = session.handler.attach()
        preface += self._endpoint_event(scope, session, first=True)

        async def serve_stream() -> None:
            try:
                await stream_session(session.handler, scope, receive, send, preface, attachment=attachment)
                await session.handler.linger()
            finally:
                self._registry.discard(session_id)
                inbound.close()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_stream)
                try:
                    yield read_stream, _ServerWriteStream(session, tg)
                finally:
                    await session.handler.close()
        finally:
            self._registry.discard(session_id)
            inbound.close()
            read_stream.close()
            await self._store.drop(session_id)

    def _unavailable(self, reason: str) -> Response:
        retry_after = str(max(1, round(self._config.retry_interval)))
        return Response(reason, status_code=503, headers={"Retry-After": retry_after})

    async def _find_resumable(self, last_event_id: str, scope: Scope) -> tuple[_Session, str] | None:
        """The session and token a Last-Event-ID resumes, if this credential may resume it."""
        parsed = parse_event_id(last_event_id)
        if parsed is None:
            return None
        session_id, token = parsed
        session = self._registry.get(session_id)
        if session is None or session.handler.ended or _owner(scope) != session.owner:
            return None
        if await self._store.replay(session_id, token, until=token) is None:  # valid, without the events
            return None
        logger.info("session %s: resuming", session.handler.tag)
        return session, token

    def _endpoint_event(self, scope: Scope, session: _Session, *, first: bool) -> bytes:
        """The ``endpoint`` event. A new session's carries the id ``<session>:0``, "before the first
        event", so a client that drops before any message can still resume; a resume's carries
        none, so the client keeps the id it resumed from."""
        path = quote(scope.get("root_path", "").rstrip("/") + self._endpoint)
        session_id = session.handler.session_id
        return encode_event(
            f"{path}?session_id={session_id}",
            event="endpoint",
            id=format_event_id(session_id, BEFORE_FIRST) if first else None,
            retry=self._config.retry_ms,
        )

    async def handle_post_message(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI app for the message endpoint: 405 to anything but POST, 413 over the body limit."""
        if scope["method"] != "POST":
            return await Response(status_code=405, headers={"Allow": "POST"})(scope, receive, send)
        await self._post_message_app(scope, receive, send)

    async def _handle_post_message(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        error_response = await self._security.validate_request(request, is_post=True)
        if error_response is not None:
            return await error_response(scope, receive, send)

        session_param = request.query_params.get("session_id")
        if session_param is None:
            return await Response("session_id is required", status_code=400)(scope, receive, send)
        try:
            session_id = UUID(hex=session_param).hex
        except ValueError:
            return await Response("Invalid session ID", status_code=400)(scope, receive, send)

        session = self._registry.get(session_id)
        if session is None or _owner(scope) != session.owner:
            # Another credential's session looks exactly like no session at all.
            logger.info("POST for unknown session %s", session_tag(session_id))
            return await Response("Could not find session", status_code=404)(scope, receive, send)

        body = await request.body()
        try:
            message = types.jsonrpc_message_adapter.validate_json(body, by_name=False)
        except ValidationError as err:
            logger.warning("session %s: could not parse a POSTed message", session.handler.tag)
            await Response("Could not parse message", status_code=400)(scope, receive, send)
            await self._report_parse_error(session, body, err)
            return

        try:
            # Hand the message over before answering 202: an accepted message is never lost.
            await session.inbound.send(SessionMessage(message, metadata=ServerMessageMetadata(request_context=request)))
        except _CLOSED:
            return await Response("Could not find session", status_code=404)(scope, receive, send)
        await Response("Accepted", status_code=202)(scope, receive, send)

    async def _report_parse_error(self, session: _Session, body: bytes, err: ValidationError) -> None:
        """Put a parse failure on the stream as well as on the 400: stock clients drop a POST's
        status, and a caller whose request was malformed would otherwise wait forever."""
        request_id = _id_of(body)
        try:
            await session.inbound.send(err)  # as stock does; the server logs and drops it
            await session.handler.send(
                error_body(
                    ErrorCode.PARSE_ERROR,
                    "Could not parse message",
                    {"id": request_id} if request_id is not None else None,
                ),
                event="error",
            )
            if request_id is not None:
                await session.handler.send(
                    _dump(_jsonrpc_error(request_id, "Invalid request", ErrorCode.INVALID_REQUEST))
                )
        except _CLOSED:
            logger.debug("session %s: ended before the parse error could be reported", session.handler.tag)
