"""The drop-in for ``mcp.server.streamable_http_manager.StreamableHTTPSessionManager``: the
Streamable HTTP front end.

Handshake-era requests (protocol 2024-11-05 to 2025-11-25, or no ``MCP-Protocol-Version``) get
sessions on the session host: each POSTed request its own flow-controlled response stream, the GET
its standalone stream, every event an id that resumes it. What has no session for us to hold
(protocol 2026-07-28's single exchanges, stateless mode) is the SDK's own code, its event streams
bounded by :mod:`~mcp_sse_transport.bounded_response`. This module parses, validates, answers and
hands over; :mod:`~mcp_sse_transport.streamable_session` runs the sessions.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any
from uuid import uuid4

import anyio
import anyio.abc
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._asgi import header
from ._sdk import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_NEGOTIATED_VERSION,
    DEFAULT_SESSION_IDLE_TIMEOUT,
    MCP_PROTOCOL_VERSION_HEADER,
    MCP_SESSION_ID_HEADER,
    Message,
    RequestBodyLimitMiddleware,
    SdkEventStore,
    Server,
    TransportSecurityMiddleware,
    TransportSecuritySettings,
    ValidationError,
    accepts,
    adopt_stock_manager,
    handshake_era,
    lifespan,
    owner_fingerprint,
    parse,
    stock_manager,
    types,
)
from .backplane import LocalBackplane
from .bounded_response import bounded_response
from .config import SseConfig
from .errors import ErrorCode
from .host import SessionHost
from .ids import session_tag
from .outbound import id_too_long, id_too_long_answer
from .registry import RegistryStatistics
from .session import SessionsFull
from .store import EventStore, InMemoryEventStore
from .streamable_session import HostedSession, Responder, json_error

__all__ = ["StreamableHTTPSessionManager"]

logger = logging.getLogger("mcp_sse_transport")

_SESSION_ID = re.compile(r"[0-9a-f]{32}")


class StreamableHTTPSessionManager:
    """Streamable HTTP sessions for MCP, a drop-in for the SDK's ``StreamableHTTPSessionManager``.

    Same constructor, ``run()`` and ``handle_request``, statuses and wire format; underneath,
    every SSE stream of a session (each POST's response stream, the standalone GET stream) is a
    :class:`~mcp_sse_transport.handler.SessionHandler` of its own, configured by ``config``:
    bounded, flow-controlled, with write deadlines and heartbeats, its events stored before they
    are written and resumable by ``Last-Event-ID``. Sessions live in this process.

    ``event_store`` takes this library's :class:`~mcp_sse_transport.store.EventStore`; an SDK
    ``EventStore`` is not used (the replay log is always this library's, so every stream is
    resumable), and says so in the log. ``retry_interval`` (milliseconds, as stock) overrides
    ``config.retry_interval``; ``max_sessions``, unless left at its default, overrides
    ``config.max_sessions``.
    """

    def __init__(
        self,
        app: Server[Any],
        event_store: EventStore | SdkEventStore | None = None,
        json_response: bool = False,
        stateless: bool = False,
        security_settings: TransportSecuritySettings | None = None,
        retry_interval: int | None = None,
        session_idle_timeout: float | None = DEFAULT_SESSION_IDLE_TIMEOUT,
        max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
        max_sessions: int | None = DEFAULT_MAX_SESSIONS,
        *,
        config: SseConfig | None = None,
    ) -> None:
        if session_idle_timeout is not None and not (math.isfinite(session_idle_timeout) and session_idle_timeout > 0):
            raise ValueError("session_idle_timeout must be a positive, finite number of seconds")
        if max_request_body_size <= 0:
            raise ValueError("max_request_body_size must be a positive number of bytes")
        if max_sessions is not None and max_sessions <= 0:
            raise ValueError("max_sessions must be a positive number of sessions or None")
        if config is None or max_sessions != DEFAULT_MAX_SESSIONS:  # an argument left at its default keeps config's
            config = replace(config or SseConfig(), max_sessions=max_sessions)
        if retry_interval is not None:
            config = replace(config, retry_interval=retry_interval / 1000)
        if config.redis_url is not None:
            raise ValueError("redis_url: Streamable HTTP sessions live in one process for now (use the SSE transport)")
        self.app = app
        self.event_store = event_store
        self.json_response = json_response
        self.stateless = stateless
        self.security_settings = security_settings
        self.retry_interval = retry_interval
        self.session_idle_timeout = session_idle_timeout
        self.max_request_body_size = max_request_body_size
        self.max_sessions = max_sessions
        self._config = config
        if isinstance(event_store, SdkEventStore):
            logger.warning("event_store: an SDK EventStore is not used; this manager keeps its own replay log")
        store = event_store if isinstance(event_store, EventStore) else None
        if store is None:  # not ``or``: an empty in-memory store is falsy (it has a length)
            store = InMemoryEventStore(
                max_events=config.replay_max_events, max_bytes=config.replay_max_bytes, max_age=config.replay_max_age
            )
        self._host = SessionHost(config, LocalBackplane(store))
        self._store = store
        self._security = TransportSecurityMiddleware(security_settings)
        # What has no session to hold: the SDK's own code, its streams bounded.
        self._stock = stock_manager(
            app,
            json_response=json_response,
            stateless=stateless,
            security_settings=security_settings,
            max_request_body_size=max_request_body_size,
        )
        self.asgi_app = RequestBodyLimitMiddleware(self._handle_request, max_request_body_size)
        self._sessions: dict[str, HostedSession] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._lifespan_state: Any = None
        self._run_lock = anyio.Lock()
        self._has_started = False

    @property
    def config(self) -> SseConfig:
        return self._config

    @property
    def _server_instances(self) -> dict[str, HostedSession]:
        """The stock manager's session map, for code that inspects it: open sessions by id."""
        return dict(self._sessions)

    @property
    def _session_owners(self) -> dict[str, str]:
        """The stock manager's map of who opened each session (here: credential fingerprints)."""
        return {
            session_id: hosted.session.owner for session_id, hosted in self._sessions.items() if hosted.session.owner
        }

    def statistics(self) -> RegistryStatistics:
        """A snapshot of every open session's standalone stream."""
        return self._host.statistics()

    @asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        """Serve sessions until the block ends: the server's lifespan, entered once for every
        session; on exit every stream is drained and ends with ``SERVER_SHUTDOWN``, and every
        request still waiting gets a JSON-RPC error. Once per instance, as stock."""
        async with self._run_lock:
            if self._has_started:
                raise RuntimeError(
                    "StreamableHTTPSessionManager .run() can only be called "
                    "once per instance. Create a new instance if you need to run again."
                )
            self._has_started = True
        async with lifespan(self.app) as state, anyio.create_task_group() as tg:
            self._lifespan_state = state
            self._task_group = tg
            adopt_stock_manager(self._stock, tg, state)
            logger.info("Streamable HTTP session manager started")
            try:
                yield
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()
                tg.cancel_scope.cancel()
                self._task_group = None

    async def shutdown(self) -> None:
        """Refuse new sessions, answer every waiting request, drain every stream within
        ``drain_timeout`` and end it with ``SERVER_SHUTDOWN`` (and a ``retry:`` hint)."""
        self._host.sessions.refuse_new()
        logger.info("shutting down %d Streamable HTTP session(s)", len(self._sessions))
        async with anyio.create_task_group() as tg:
            for hosted in list(self._sessions.values()):
                tg.start_soon(hosted.shut_down)

    async def handle_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app of the endpoint (413 past ``max_request_body_size``)."""
        await self.asgi_app(scope, receive, send)

    async def _handle_request(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._task_group is None:
            raise RuntimeError("Task group is not initialized. Make sure to use run().")
        version = header(scope, MCP_PROTOCOL_VERSION_HEADER)
        if self.stateless or not handshake_era(version):
            async with bounded_response(scope, send, self._config) as bounded:
                await self._stock.handle_request(scope, receive, bounded)
            return
        request = Request(scope, receive)
        error = await self._security.validate_request(request, is_post=request.method == "POST")
        if error is not None:
            return await error(scope, receive, send)
        if self._host.sessions.shutting_down:
            return await json_error(
                "Server shutting down", 503, ErrorCode.SERVER_SHUTDOWN, retry=self._config.retry_after
            )(scope, receive, send)
        session_id = request.headers.get(MCP_SESSION_ID_HEADER)
        if session_id is None:
            if request.method == "POST":
                return await self._open(request, scope, receive, send)
            if request.method in ("GET", "DELETE"):
                return await json_error("Bad Request: Missing session ID", 400)(scope, receive, send)
            return await _unsupported(None)(scope, receive, send)
        hosted = self._find(session_id, scope)
        if hosted is None:
            return await json_error("Session not found", 404)(scope, receive, send)
        async with hosted.busy():
            await self._serve(hosted, request, scope, receive, send)

    def _forget(self, hosted: HostedSession) -> None:
        if self._sessions.get(hosted.session_id) is hosted:
            del self._sessions[hosted.session_id]

    def _find(self, session_id: str, scope: Scope) -> HostedSession | None:
        hosted = self._sessions.get(session_id) if _SESSION_ID.fullmatch(session_id) else None
        if hosted is None:
            logger.info("request for unknown session %s", session_tag(session_id[:64]))
            return None
        if owner_fingerprint(scope) != hosted.session.owner:
            # A session answers only the credential that opened it; to others it does not exist.
            logger.warning("refused a request for session %s: another credential opened it", hosted.tag)
            return None
        return hosted

    async def _serve(self, hosted: HostedSession, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        method = request.method
        if method == "POST":
            message = await self._read_post(request, scope, receive, send, hosted.session_id)
            if message is not None:
                await hosted.post(message[0], message[1], request, Responder(scope, receive, send))
        elif method == "GET":
            _, has_sse = accepts(request)
            if not has_sse:
                error = json_error(
                    "Not Acceptable: Client must accept text/event-stream", 406, session=hosted.session_id
                )
                return await error(scope, receive, send)
            last_event_id = request.headers.get("last-event-id")
            version = request.headers.get(MCP_PROTOCOL_VERSION_HEADER, DEFAULT_NEGOTIATED_VERSION)
            del request
            await hosted.get(last_event_id, version, Responder(scope, receive, send))
        elif method == "DELETE":
            self._forget(hosted)
            hosted.terminate()
            await Response(None, 200, headers=hosted.headers(), media_type="application/json")(scope, receive, send)
        else:
            await _unsupported(hosted.session_id)(scope, receive, send)

    async def _open(self, request: Request, scope: Scope, receive: Receive, send: Send) -> None:
        """A POST without a session: only an ``initialize`` opens one."""
        message = await self._read_post(request, scope, receive, send, None)
        if message is None:
            return
        parsed, body = message
        if not (isinstance(parsed, types.JSONRPCRequest) and parsed.method == "initialize"):
            return await json_error("Bad Request: Missing session ID", 400)(scope, receive, send)
        assert self._task_group is not None
        try:
            session, read_stream = await self._host.open(uuid4().hex, owner_fingerprint(scope), None)
        except SessionsFull:
            return await json_error(
                "Too many open sessions", 503, ErrorCode.INTERNAL_ERROR, retry=self._config.retry_after
            )(scope, receive, send)
        hosted = HostedSession(
            session, self._host, self._store, self.session_idle_timeout, self.json_response, self._forget
        )
        self._sessions[session.session_id] = hosted
        await self._task_group.start(hosted.serve, self.app, read_stream, self._lifespan_state)
        responder = Responder(scope, receive, send)
        try:
            async with hosted.busy():
                await hosted.post(parsed, body, request, responder)
        finally:
            if responder.status is None or responder.status >= 400:  # nothing was established
                self._forget(hosted)
                hosted.terminate()

    async def _read_post(
        self, request: Request, scope: Scope, receive: Receive, send: Send, session_id: str | None
    ) -> tuple[Message, bytes] | None:
        """The POSTed message, or ``None`` once the POST was refused (406, 415, 400)."""
        has_json, has_sse = accepts(request)
        if self.json_response and not has_json:
            error = json_error("Not Acceptable: Client must accept application/json", 406, session=session_id)
        elif not self.json_response and not (has_json and has_sse):
            error = json_error(
                "Not Acceptable: Client must accept both application/json and text/event-stream",
                406,
                session=session_id,
            )
        elif request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            error = json_error("Unsupported Media Type: Content-Type must be application/json", 415, session=session_id)
        else:
            try:
                body = await request.body()
            except ClientDisconnect:  # the client left mid-body: nobody to answer
                logger.info("a POST's client disconnected before its body arrived")
                return None
            try:
                json.loads(body)
            except (ValueError, RecursionError) as exc:
                error = json_error(f"Parse error: {exc}", 400, ErrorCode.PARSE_ERROR, session=session_id)
            else:
                try:
                    message = parse(body)
                except ValidationError as exc:
                    error = json_error(f"Validation error: {exc}", 400, -32602, session=session_id)
                else:
                    if not id_too_long(message, self._config.max_request_id_bytes):
                        return message, body
                    text = id_too_long_answer(self._config.max_request_id_bytes)
                    headers = {MCP_SESSION_ID_HEADER: session_id} if session_id else None
                    error = Response(text, 400, headers=headers, media_type="application/json")
        await error(scope, receive, send)
        return None


def _unsupported(session_id: str | None) -> Response:
    return json_error("Method Not Allowed", 405, session=session_id, headers={"Allow": "GET, POST, DELETE"})
