"""The drop-in for ``mcp.server.sse.SseServerTransport``: the legacy HTTP+SSE front end.

It parses, validates and answers HTTP; sessions are the session host's, and where they live
beyond this worker is the backplane's business.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from types import TracebackType
from typing import Any
from urllib.parse import quote
from uuid import UUID, uuid4

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._asgi import SSE_HEADERS, header, stream_session
from ._sdk import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    Inbound,
    ReadStream,
    RequestBodyLimitMiddleware,
    Server,
    SessionMessage,
    TransportSecurityMiddleware,
    TransportSecuritySettings,
    WriteStream,
    ended_streams,
    owner_fingerprint,
    speaks_handshake,
)
from .backplane import Backplane, LocalBackplane, Resume
from .config import SseConfig
from .errors import ErrorCode, StoreError
from .events import encode_error, encode_event
from .host import SessionHost
from .ids import format_event_id, parse_event_id, secret_matches, session_tag
from .registry import RegistryStatistics
from .session import NOT_FOUND, NOT_HERE, Outcome, Restore, SessionsFull
from .store import BEFORE_FIRST, EventStore, InMemoryEventStore

__all__ = ["RequestRejected", "SseServerTransport"]

logger = logging.getLogger("mcp_sse_transport")


class RequestRejected(ValueError):
    """``connect_sse`` refused the request and already answered it (a ValueError, as in stock)."""


def _restoration(scope: Scope) -> Restore | None:
    """What a new session replays for this GET: a handshake at the protocol version of its
    ``MCP-Protocol-Version`` header (only an initialized client sends one), if the SDK speaks it
    through ``initialize``; else nothing, and the session starts as any other."""
    version = header(scope, "mcp-protocol-version")
    if version is None:
        return None
    version = version.strip()
    return Restore(version) if speaks_handshake(version) else None


def _backplane(config: SseConfig, event_store: EventStore | None, server: Server[Any] | None) -> Backplane:
    if config.redis_url is None:
        store = event_store or InMemoryEventStore(
            max_events=config.replay_max_events, max_bytes=config.replay_max_bytes, max_age=config.replay_max_age
        )
        return LocalBackplane(store)
    if server is None:
        raise ValueError("redis_url needs server=...: a worker that takes a session over runs it")
    from .cluster import RedisBackplane

    return RedisBackplane(config, event_store, server)


class SseServerTransport:
    """SSE server transport for MCP, a drop-in for ``mcp.server.sse.SseServerTransport``.

    ``connect_sse`` serves the GET stream and yields the SDK server's streams;
    ``handle_post_message`` is the ASGI app for the POST endpoint. Same constructor, statuses,
    texts and wire format as the stock class; underneath, each session's events go through a
    :class:`~mcp_sse_transport.handler.SessionHandler` configured by ``config``.

    With ``config.redis_url`` set, sessions live in Redis: any worker sharing it serves any
    request, and a dead worker's sessions are taken over. That needs ``server`` (a worker runs it
    for the sessions it takes over) and the transport entered (``async with transport:``) for
    as long as it serves; :func:`~mcp_sse_transport.sse_app` does both.
    """

    def __init__(
        self,
        endpoint: str,
        security_settings: TransportSecuritySettings | None = None,
        max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
        *,
        config: SseConfig | None = None,
        event_store: EventStore | None = None,
        server: Server[Any] | None = None,
    ) -> None:
        """``endpoint`` is the relative path clients POST to, e.g. ``"/messages/"``.

        Raises ValueError for a full URL (``://``, a leading ``//``, ``?`` or ``#``) and for a
        non-positive ``max_request_body_size``, as the stock class does; with ``redis_url``, for
        a missing ``server`` or an ``event_store`` that is not a ``RedisEventStore``.
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
        self._backplane = _backplane(self._config, event_store, server)
        self._host = SessionHost(self._config, self._backplane)

    @property
    def config(self) -> SseConfig:
        return self._config

    @property
    def _read_stream_writers(self) -> dict[UUID, Inbound]:
        """The stock class's session map, for code that inspects it: open sessions by UUID."""
        return {UUID(hex=session_id): session.inbound for session_id, session in self._host.sessions.items()}

    def statistics(self) -> RegistryStatistics:
        """A snapshot of every open session's stream."""
        return self._host.statistics()

    async def __aenter__(self) -> SseServerTransport:
        """Join the other workers (with ``redis_url``; nothing to do without). Raises StoreError
        when Redis cannot be reached."""
        await self._backplane.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        """:meth:`shutdown`, then leave the other workers."""
        try:
            await self.shutdown()
        finally:
            await self._backplane.__aexit__(exc_type, exc_val, exc_tb)

    async def shutdown(self) -> None:
        """Refuse new sessions, then drain every open stream within ``drain_timeout`` and end it
        with an ``event: error`` (code ``SERVER_SHUTDOWN``) carrying a ``retry:`` hint.

        With ``redis_url``, sessions are handed off rather than ended: their leases are given up,
        so the client's resume, on another worker, takes each one over at once."""
        await self._host.shutdown()

    @asynccontextmanager
    async def connect_sse(
        self, scope: Scope, receive: Receive, send: Send
    ) -> AsyncIterator[tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]]:
        """Serve this GET's event stream and yield ``(read_stream, write_stream)`` for ``Server.run``.

        A GET with ``Last-Event-ID`` (header, or the ``last_event_id`` query parameter) resumes
        that session: the session's server is already running, so the yielded streams are at end
        of stream and ``Server.run`` returns at once, while the stream is served until it ends.
        Raises ValueError (:class:`RequestRejected`), after answering the request itself, when it
        fails the Host/Origin checks (421/403), arrives during shutdown (503), would open a
        session past ``max_sessions`` (503), or Redis cannot be reached (503).
        """
        if scope["type"] != "http":
            raise ValueError("connect_sse can only handle HTTP requests")
        self._backplane.check_running()
        request = Request(scope, receive)
        error_response = await self._security.validate_request(request, is_post=False)
        if error_response is None and self._host.sessions.shutting_down:
            error_response = self._unavailable("Server shutting down")
        if error_response is not None:
            await error_response(scope, receive, send)
            raise RequestRejected("Request validation failed")
        last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        del request  # held for the session's whole life otherwise

        if scope["method"] == "HEAD":
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            yield ended_streams()
            return

        preface = b""
        if last_event_id:
            resume = await self._find_resumable(last_event_id, scope, receive, send)
            if resume is not None:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(resume)
                    yield ended_streams()
                return
            logger.info("resume refused: Last-Event-ID names no resumable session")
            preface = encode_error(ErrorCode.RESUME_UNKNOWN, "Unknown or expired Last-Event-ID; a new session starts")

        session_id = uuid4().hex
        try:
            session, read_stream = await self._host.open(session_id, owner_fingerprint(scope), _restoration(scope))
        except SessionsFull:
            await self._unavailable("Too many open sessions")(scope, receive, send)
            raise RequestRejected("Too many open sessions") from None
        except StoreError as exc:
            logger.error("refused a session: %s", exc)
            await self._unavailable("Session store unavailable")(scope, receive, send)
            raise RequestRejected("Session store unavailable") from exc
        handler = session.handler
        # Attached before the server can write, so nothing it writes is taken for a detached session.
        attachment = handler.attach()
        preface += self._endpoint_event(scope, session_id, handler.secret)

        async def serve_stream() -> None:
            try:
                await stream_session(handler, scope, receive, send, preface, attachment=attachment)
                await self._host.linger(session)
            finally:
                self._host.discard(session)
            # Ended for good: nobody can ever read what its server still does. Cancel the server's
            # run (the caller's ``async with`` body), which cancels every request in flight.
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_stream)
                try:
                    yield read_stream, self._host.write_stream(session, tg)
                except anyio.get_cancelled_exc_class():
                    if not handler.ended:
                        # The worker is going away (a forced shutdown), not the session: end it
                        # here at once, and with Redis another worker takes it over.
                        session.handed_off = True
                        handler.abort("this worker stopped serving it")
                    raise
                finally:
                    await handler.close()
        finally:
            self._host.discard(session)
            read_stream.close()
            with anyio.CancelScope(shield=True):
                await self._host.forget(session)

    def _unavailable(self, reason: str) -> Response:
        return Response(reason, status_code=503, headers=self._config.retry_after)

    async def _find_resumable(self, last_event_id: str, scope: Scope, receive: Receive, send: Send) -> Resume | None:
        """What serves the resume a Last-Event-ID asks for, if this credential may resume it.
        Answers 503 itself if the store cannot be reached."""
        parsed = parse_event_id(last_event_id)
        if parsed is None:
            return None
        session_id, token, secret = parsed
        try:
            # Its place in line, drawn first, as it arrives: from the backplane (0: it does not
            # know the session), so every worker shares one order, never a clock.
            arrived = await self._backplane.claims.next(session_id)
            if not arrived:
                return None
            session = self._host.serving(session_id)
            if session is None:
                preface = self._endpoint_event(scope, session_id)
                return await self._backplane.resume_elsewhere(parsed, arrived, scope, receive, send, preface)
            if (
                session.handler.ended
                or not secret_matches(secret, session.handler.secret)
                or owner_fingerprint(scope) != session.owner
            ):
                return None
            if await self._backplane.store.replay(session_id, token, until=token) is None:  # valid, without the events
                return None
        except StoreError as exc:
            logger.warning("resume refused: %s", exc)
            await self._unavailable("Session store unavailable")(scope, receive, send)
            raise RequestRejected("Session store unavailable") from exc
        logger.info("session %s: resuming", session.handler.tag)
        preface = self._endpoint_event(scope, session_id)
        return partial(stream_session, session.handler, scope, receive, send, preface, after=token, arrived=arrived)

    def _endpoint_event(self, scope: Scope, session_id: str, secret: str | None = None) -> bytes:
        """The ``endpoint`` event. A new session's (given its ``secret``) carries the id
        ``<session>.<secret>:0``, "before the first event", so a client that drops before any
        message can still resume; a resume's carries none, so the client keeps the id it resumed
        from."""
        path = quote(scope.get("root_path", "").rstrip("/") + self._endpoint)
        return encode_event(
            f"{path}?session_id={session_id}",
            event="endpoint",
            id=None if secret is None else format_event_id(session_id, BEFORE_FIRST, secret),
            retry=self._config.retry_ms,
        )

    async def handle_post_message(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI app for the message endpoint: 405 to anything but POST, 413 over the body limit."""
        if scope["method"] != "POST":
            return await Response(status_code=405, headers={"Allow": "POST"})(scope, receive, send)
        self._backplane.check_running()
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

        session = self._host.serving(session_id)
        if session is None:
            outcome = await self._backplane.post_elsewhere(session_id, request)
        elif owner_fingerprint(scope) != session.owner:
            # Another credential's session looks exactly like no session at all.
            logger.info("POST for unknown session %s", session_tag(session_id))
            outcome = NOT_FOUND
        else:
            outcome = await self._host.deliver(session, await request.body(), request)
            if outcome.status == NOT_HERE.status:  # it ended here: where it lives now, if anywhere
                outcome = await self._backplane.post_elsewhere(session_id, request)
        await self._response(outcome)(scope, receive, send)
        if outcome.report is not None:
            await outcome.report()

    def _response(self, outcome: Outcome) -> Response:
        headers = self._config.retry_after if outcome.retry else None
        media_type = "application/json" if outcome.json else None
        return Response(outcome.text, status_code=outcome.status, headers=headers, media_type=media_type)
