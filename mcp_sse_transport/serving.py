"""One line to serve an MCP server over this transport: ``sse_app``, ``uvicorn_server``, ``run``."""

from __future__ import annotations

import logging
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any, Literal, cast

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol as _UvicornH11Protocol

from ._asgi import ABORT_EXTENSION
from ._sdk import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_IDLE_TIMEOUT,
    Served,
    Server,
    TransportSecuritySettings,
    app_lifespan,
    app_state,
    lowlevel_server,
    server_wiring,
)
from .config import SseConfig
from .store import EventStore
from .streamable import StreamableHTTPSessionManager
from .transport import RequestRejected, SseServerTransport

__all__ = ["H11Protocol", "Transport", "run", "sse_app", "streamable_http_app", "uvicorn_server"]

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

Transport = Literal["sse", "streamable-http", "both"]
"""What :func:`run` and :func:`uvicorn_server` serve: legacy HTTP+SSE (``/sse``), Streamable
HTTP (``/mcp``), or both from one app."""


def _local_security(
    transport_security: TransportSecuritySettings | None, host: str
) -> TransportSecuritySettings | None:
    """As the SDK's apps: DNS-rebinding protection for local hosts unless the caller says otherwise."""
    if transport_security is None and host in _LOCAL_HOSTS:
        return TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
        )
    return transport_security


class _SseEndpoint:
    """The GET endpoint as a raw ASGI app: it answers once, unlike a ``return Response()`` after
    ``connect_sse``, which sends a second response on shutdown and on HEAD."""

    def __init__(self, transport: SseServerTransport, server: Server[Any]) -> None:
        self._transport = transport
        self._server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self._transport.connect_sse(scope, receive, send) as (read_stream, write_stream):
                await self._server.run(read_stream, write_stream, self._server.create_initialization_options())
        except RequestRejected:
            pass  # connect_sse already answered it (421, 403 or 503)


def sse_app(
    server: Served,
    *,
    sse_path: str = "/sse",
    message_path: str = "/messages/",
    config: SseConfig | None = None,
    transport_security: TransportSecuritySettings | None = None,
    max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
    host: str = "127.0.0.1",
    debug: bool = False,
) -> Starlette:
    """A Starlette app serving ``server`` (an ``MCPServer``, a lowlevel ``Server``, or any server
    of the README's versions table) over SSE.

    As ``MCPServer.sse_app()``: DNS-rebinding protection is on for local hosts unless
    ``transport_security`` says otherwise, and an ``MCPServer``'s auth settings, routes and
    custom routes are wired the same way. The transport is at ``app.state.sse_transport``; the
    app's lifespan joins the Redis cluster when ``config.redis_url`` is set, and its shutdown
    drains every stream (and, with Redis, hands every session off to the other workers).
    """
    transport_security = _local_security(transport_security, host)
    lowlevel = lowlevel_server(server)
    transport = SseServerTransport(
        message_path,
        security_settings=transport_security,
        max_request_body_size=max_request_body_size,
        config=config,
        server=lowlevel,
    )
    sse_endpoint: ASGIApp = _SseEndpoint(transport, lowlevel)
    post_endpoint: ASGIApp = transport.handle_post_message
    sse_endpoint, post_endpoint, routes, middleware = server_wiring(
        server, sse_endpoint, post_endpoint, sse_path, message_path
    )
    routes[:0] = [Route(sse_path, endpoint=sse_endpoint, methods=["GET"]), Mount(message_path, app=post_endpoint)]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        # the framework's lifespan outside: the transport's shutdown drains sessions that use it
        async with app_lifespan(server), transport:  # joins the Redis cluster with redis_url
            yield

    app = Starlette(debug=debug, routes=routes, middleware=middleware, lifespan=lifespan)
    _set_state(app, server, "sse", sse_path)
    app.state.sse_transport = transport
    return app


def _set_state(app: Starlette, server: Served, transport: str, path: str) -> None:
    for name, value in app_state(server, transport, path).items():
        setattr(app.state, name, value)


class _StreamableEndpoint:
    """The Streamable HTTP endpoint as a raw ASGI app (a bound method would be taken for a
    request/response function by Starlette's ``Route``)."""

    def __init__(self, manager: StreamableHTTPSessionManager) -> None:
        self._manager = manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._manager.handle_request(scope, receive, send)


def streamable_http_app(
    server: Served,
    *,
    streamable_http_path: str = "/mcp",
    config: SseConfig | None = None,
    json_response: bool = False,
    stateless_http: bool = False,
    event_store: EventStore | None = None,
    retry_interval: int | None = None,
    max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
    session_idle_timeout: float | None = DEFAULT_SESSION_IDLE_TIMEOUT,
    max_sessions: int | None = DEFAULT_MAX_SESSIONS,
    transport_security: TransportSecuritySettings | None = None,
    host: str = "127.0.0.1",
    debug: bool = False,
) -> Starlette:
    """A Starlette app serving ``server`` over Streamable HTTP at ``streamable_http_path``, as
    ``MCPServer.streamable_http_app()`` wires it (DNS-rebinding protection for local hosts, an
    ``MCPServer``'s auth and custom routes), with this library's manager. The manager is at
    ``app.state.session_manager``; the app's lifespan runs it."""
    manager = StreamableHTTPSessionManager(
        lowlevel_server(server),
        event_store,
        json_response,
        stateless_http,
        _local_security(transport_security, host),
        retry_interval,
        session_idle_timeout,
        max_request_body_size,
        max_sessions,
        config=config,
    )
    endpoint: ASGIApp = _StreamableEndpoint(manager)
    endpoint, _, routes, middleware = server_wiring(
        server, endpoint, endpoint, streamable_http_path, f"{streamable_http_path.rstrip('/')}/_messages/"
    )
    routes[:0] = [Route(streamable_http_path, endpoint=endpoint)]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with app_lifespan(server), manager.run():
            yield

    app = Starlette(debug=debug, routes=routes, middleware=middleware, lifespan=lifespan)
    _set_state(app, server, "streamable-http", streamable_http_path)
    app.state.session_manager = manager
    return app


def _app(server: Served, transport: Transport, config: SseConfig | None, host: str) -> Starlette:
    """The app :func:`run` serves: one transport's, or both from one app (the SSE app's routes,
    then the Streamable HTTP endpoint; both lifespans)."""
    if transport == "sse":
        return sse_app(server, config=config, host=host)
    streamable = streamable_http_app(server, config=config, host=host)
    if transport == "streamable-http":
        return streamable
    legacy = sse_app(server, config=config, host=host)
    manager: StreamableHTTPSessionManager = streamable.state.session_manager
    sse_transport: SseServerTransport = legacy.state.sse_transport

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with app_lifespan(server), sse_transport, manager.run():
            yield

    routes = [*legacy.routes[:2], streamable.routes[0], *legacy.routes[2:]]
    app = Starlette(routes=routes, middleware=legacy.user_middleware, lifespan=lifespan)
    _set_state(app, server, "sse", "/sse")  # fastmcp reads one transport and path per app (README)
    app.state.sse_transport = sse_transport
    app.state.session_manager = manager
    return app


_LINGER_RESET = struct.pack("ii", 1, 0)
"""``SO_LINGER`` on with a zero timeout: ``close`` sends RST and frees the socket's buffers."""


class H11Protocol(_UvicornH11Protocol):
    """uvicorn's h11 protocol, offering the transport (through ``ABORT_EXTENSION``) a way to drop
    a stuck connection at once, and to cap an event stream's kernel send buffer.

    Without it a session cut loose still frees its tasks and buffers, but uvicorn keeps the
    socket until the client reads what is queued. ``uvicorn --http
    mcp_sse_transport.serving:H11Protocol`` installs it; ``uvicorn_server`` and ``run`` do so.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _redact_access_log()  # for ``uvicorn --http``, which calls neither uvicorn_server nor run

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None:
            scope = cast(dict[str, Any], self.cycle.scope)
            scope.setdefault("extensions", {})[ABORT_EXTENSION] = {
                "abort": self._abort,
                "set_send_buffer": self._set_send_buffer,
            }

    def _abort(self) -> None:
        """Drop the connection at once, discarding what uvicorn still holds. If it holds anything,
        the kernel's send buffer is full: the client stopped reading, and a plain close would
        leave the kernel trickling that buffer to it from FIN-WAIT-1 while the client never sees
        its stream end. Then the connection is reset instead (nginx's
        ``reset_timedout_connection``): the kernel frees its buffers, the client gets
        ``ECONNRESET``. A connection with nothing left in uvicorn is closed, so what the kernel
        already took (a final error event, say) still arrives."""
        if self.transport.get_write_buffer_size() > 0:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with suppress(OSError):  # already closed: abort has nothing left to reset
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.transport.abort()

    def _set_send_buffer(self, size: int) -> None:
        """Cap the socket's kernel send buffer (``SO_SNDBUF``) at ``size`` bytes, which also turns
        off the kernel's autotuning of it (Linux doubles the value, for its bookkeeping)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):  # closed meanwhile: nothing to cap
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class _RedactSessionIds(logging.Filter):
    """Cut session ids and event ids in uvicorn's access log to their first 8 characters: both
    are bearer capabilities, and the POST endpoint carries the one, a browser's first resume
    (``last_event_id=``) the other, with its resume secret, in the query string."""

    _SESSION_ID = re.compile(r"((?:session_id|last_event_id)=[0-9a-fA-F]{8})[^&\s\"]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._SESSION_ID.sub(r"\1…", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


_redact_session_ids = _RedactSessionIds()


def _redact_access_log() -> None:
    access_log = logging.getLogger("uvicorn.access")
    if _redact_session_ids not in access_log.filters:
        access_log.addFilter(_redact_session_ids)


class _Server(uvicorn.Server):
    """Drains every SSE stream as uvicorn starts shutting down, instead of after it waited for
    them (uvicorn runs the lifespan shutdown only once all connections have ended)."""

    def __init__(self, config: uvicorn.Config, drains: Sequence[Callable[[], Coroutine[Any, Any, None]]]) -> None:
        super().__init__(config)
        self._drains = drains

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        async with anyio.create_task_group() as tg:
            for drain in self._drains:
                tg.start_soon(drain)
            await super().shutdown(sockets)


def uvicorn_server(
    target: Served | Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: SseConfig | None = None,
    transport: Transport = "sse",
    log_level: str = "info",
    **uvicorn_options: Any,
) -> uvicorn.Server:
    """A ``uvicorn.Server`` for ``target`` (a server, or an app from :func:`sse_app` or
    :func:`streamable_http_app`) whose shutdown drains every stream and ends it with the shutdown
    event. ``transport`` picks what a server is served over. ``await server.serve(sockets=...)``
    to run it; set ``server.should_exit = True`` to stop it."""
    app = target if isinstance(target, Starlette) else _app(target, transport, config, host)
    drains = [
        part.shutdown
        for part in (getattr(app.state, "sse_transport", None), getattr(app.state, "session_manager", None))
        if isinstance(part, SseServerTransport | StreamableHTTPSessionManager)
    ]
    uvicorn_options.setdefault("http", H11Protocol)
    uvicorn_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **uvicorn_options)
    _redact_access_log()
    return _Server(uvicorn_config, drains)


def run(
    target: Served | Starlette,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: SseConfig | None = None,
    transport: Transport = "sse",
    sockets: Sequence[socket.socket] | None = None,
    **uvicorn_options: Any,
) -> None:
    """Serve ``target`` with uvicorn (over ``transport``: ``"sse"``, ``"streamable-http"`` or
    ``"both"``) until SIGINT or SIGTERM, then shut down gracefully."""
    server = uvicorn_server(target, host=host, port=port, config=config, transport=transport, **uvicorn_options)
    anyio.run(lambda: server.serve(sockets=list(sockets) if sockets is not None else None))
