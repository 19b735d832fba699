"""The one module that knows the MCP SDK: every import of it, and every version-specific detail.

Stream types, message (de)serialization, server wiring, auth context and the SDK's HTTP helpers
are reached through here, so supporting another SDK release changes this module alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any

import anyio.abc
import mcp_types as types
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, auth_context_var
from mcp.server.auth.middleware.bearer_auth import (
    AuthenticatedUser,
    AuthorizationContext,
    BearerAuthBackend,
    RequireAuthMiddleware,
    authorization_context,
)
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import (
    build_resource_metadata_url,
    create_auth_routes,
    create_protected_resource_routes,
)
from mcp.server.lowlevel.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.runner import serve_loop
from mcp.server.streamable_http import (
    LAST_EVENT_ID_HEADER,
    MCP_SESSION_ID_HEADER,
    REQUEST_CANCELLED,
    StreamableHTTPServerTransport,
    check_accept_headers,
)
from mcp.server.streamable_http import EventMessage as SdkEventMessage
from mcp.server.streamable_http import EventStore as SdkEventStore
from mcp.server.streamable_http_manager import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_IDLE_TIMEOUT,
)
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager as StockSessionManager
from mcp.server.transport_security import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    RequestBodyLimitMiddleware,
    TransportSecurityMiddleware,
    TransportSecuritySettings,
)
from mcp.shared._context_streams import ContextReceiveStream, ContextSendStream, create_context_streams
from mcp.shared._httpx_utils import (
    McpHttpClientFactory,
    create_mcp_http_client,
    request_within_origin,
    sse_within_origin,
)
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.inbound import MCP_PROTOCOL_VERSION_HEADER
from mcp.shared.message import CloseSSEStreamCallback, ServerMessageMetadata, SessionMessage
from mcp_types import DEFAULT_NEGOTIATED_VERSION
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, is_version_at_least
from pydantic import ValidationError
from starlette.authentication import BaseUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Scope

__all__ = [
    "DEFAULT_MAX_REQUEST_BODY_SIZE",
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_NEGOTIATED_VERSION",
    "DEFAULT_SESSION_IDLE_TIMEOUT",
    "LAST_EVENT_ID_HEADER",
    "MCP_PROTOCOL_VERSION_HEADER",
    "MCP_SESSION_ID_HEADER",
    "PER_SESSION_RELEASE_WITHIN",
    "REQUEST_CANCELLED",
    "CloseSSEStreamCallback",
    "ContextReceiveStream",
    "ContextSendStream",
    "Inbound",
    "MCPServer",
    "McpHttpClientFactory",
    "PerSessionStoreManager",
    "ReadStream",
    "RequestBodyLimitMiddleware",
    "SdkEventMessage",
    "SdkEventStore",
    "Server",
    "ServerMessageMetadata",
    "SessionMessage",
    "StockSessionManager",
    "TransportSecurityMiddleware",
    "TransportSecuritySettings",
    "ValidationError",
    "WriteStream",
    "accepts",
    "adopt_stock_manager",
    "answered_id",
    "auth_context",
    "create_context_streams",
    "create_mcp_http_client",
    "dump",
    "ended_streams",
    "forwarded_user",
    "handshake_era",
    "jsonrpc_error",
    "lifespan",
    "lowlevel_server",
    "metadata",
    "owner_fingerprint",
    "parse",
    "primes_streams",
    "related_request_id",
    "request_within_origin",
    "restored_handshake",
    "serialize",
    "serve_session",
    "server_streams",
    "server_wiring",
    "speaks_handshake",
    "sse_within_origin",
    "types",
    "user_token",
]

Inbound = ContextSendStream[SessionMessage | Exception]
"""The sending end of an SDK server's read stream."""

RESTORED_REQUEST_ID = "mcp-sse-transport/restore"
"""The id of a restored session's synthetic ``initialize``, whose response is swallowed."""


def server_streams() -> tuple[Inbound, ContextReceiveStream[SessionMessage | Exception]]:
    """A server run's read stream and the end the transport sends POSTed messages into."""
    return create_context_streams[SessionMessage | Exception](0)


def ended_streams() -> tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]:
    """Streams for a ``Server.run`` that has nothing to serve: reads end, writes are refused."""
    inbound, read_stream = server_streams()
    write_stream, outbound = create_context_streams[SessionMessage](0)
    inbound.close()
    outbound.close()
    return read_stream, write_stream


def lowlevel_server(server: MCPServer[Any] | Server[Any]) -> Server[Any]:
    """The lowlevel ``Server`` that runs a session, of an ``MCPServer`` or itself."""
    return server._lowlevel_server if isinstance(server, MCPServer) else server


# -- messages ------------------------------------------------------------------------------------


def parse(body: bytes | str) -> types.JSONRPCMessage:
    """A POSTed JSON-RPC message; raises :class:`ValidationError` when it is not one."""
    return types.jsonrpc_message_adapter.validate_json(body, by_name=False)


def serialize(message: types.JSONRPCMessage) -> bytes:
    """Bytes straight from pydantic-core: what ``model_dump_json`` does, without the str round
    trip. Raises ValueError or TypeError for a message that cannot be serialized."""
    return message.__pydantic_serializer__.to_json(message, by_alias=True, exclude_unset=True)


def dump(message: types.JSONRPCMessage) -> str:
    return message.model_dump_json(by_alias=True, exclude_unset=True)


def jsonrpc_error(request_id: types.RequestId, message: str, code: int) -> types.JSONRPCError:
    return types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))


def answered_id(message: types.JSONRPCMessage) -> types.RequestId | None:
    """The id a response or error answers; ``None`` for requests and notifications."""
    return message.id if isinstance(message, types.JSONRPCResponse | types.JSONRPCError) else None


def speaks_handshake(version: str) -> bool:
    """Whether the SDK negotiates ``version`` through ``initialize``."""
    return version in HANDSHAKE_PROTOCOL_VERSIONS


def restored_handshake(version: str) -> tuple[types.JSONRPCRequest, types.JSONRPCNotification]:
    """The ``initialize`` and ``notifications/initialized`` of a restored session: the client's
    protocol version; no capabilities (the server must not ask it for roots, sampling or
    elicitation it may not have); a client info that says the session was restored."""
    client_info = {"name": "mcp-sse-transport-restored-session", "version": "0"}
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": client_info}
    initialize = types.JSONRPCRequest(jsonrpc="2.0", id=RESTORED_REQUEST_ID, method="initialize", params=params)
    return initialize, types.JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized")


def metadata(
    request: Request,
    on_unanswered: Callable[[], Awaitable[None]] | None = None,
    *,
    close_stream: CloseSSEStreamCallback | None = None,
    close_standalone: CloseSSEStreamCallback | None = None,
    can_send_request: bool = True,
) -> ServerMessageMetadata:
    """A POSTed message's metadata: its HTTP request, what runs if a request settles without an
    answer (cancelled: mcp 2.x never answers it), and for Streamable HTTP the callbacks behind
    ``ctx.close_sse_stream()`` and whether the request's channel can carry server requests."""
    result = ServerMessageMetadata(
        request_context=request,
        close_sse_stream=close_stream,
        close_standalone_sse_stream=close_standalone,
        can_send_request=can_send_request,
    )
    if on_unanswered is not None:
        result.on_request_unanswered = on_unanswered
    return result


def related_request_id(item: SessionMessage) -> types.RequestId | None:
    """The client request a server's outbound message belongs to (its progress, its logs, its
    own requests), if the server said."""
    meta = item.metadata
    return meta.related_request_id if isinstance(meta, ServerMessageMetadata) else None


# -- Streamable HTTP -----------------------------------------------------------------------------


def handshake_era(version: str | None) -> bool:
    """Whether a Streamable HTTP request with this ``MCP-Protocol-Version`` (``None``: no header)
    belongs to the sessions of the handshake era (2024-11-05 to 2025-11-25), as the SDK routes it;
    any other value goes to the SDK's single-exchange entry (2026-07-28), which validates it."""
    return version is None or version in HANDSHAKE_PROTOCOL_VERSIONS


def primes_streams(version: str) -> bool:
    """Whether a client at ``version`` gets a priming event (an id, empty data) first on each POST
    stream, and may have its streams closed for polling: 2025-11-25 on, as the SDK decides."""
    return is_version_at_least(version, "2025-11-25")


def accepts(request: Request) -> tuple[bool, bool]:
    """Whether the request's ``Accept`` takes JSON, and event streams, as the SDK reads it."""
    return check_accept_headers(request)


def lifespan(server: Server[Any]) -> AbstractAsyncContextManager[Any]:
    """The server's lifespan, which a session manager enters once for all its sessions."""
    return server.lifespan(server)


def adopt_stock_manager(manager: StockSessionManager, task_group: anyio.abc.TaskGroup, lifespan_state: Any) -> None:
    """Let the SDK's manager serve requests inside our ``run()``: what its own ``run()`` would
    set, without entering the server's lifespan a second time."""
    manager._task_group = task_group  # type: ignore[assignment]
    manager._lifespan_state = lifespan_state  # pyright: ignore[reportPrivateUsage]
    manager._has_started = True  # pyright: ignore[reportPrivateUsage]


PER_SESSION_RELEASE_WITHIN = 10.0
"""Seconds a discarded session's event store gets to let go of its events (shielded: the
manager may be shutting down), so an unreachable store cannot hold the shutdown up."""


class PerSessionStoreManager(StockSessionManager):
    """The SDK's own session manager, with an event store of its own for each session's
    transport: the stock one hands one store to every transport, whose stream ids (the GET's
    ``_GET_stream``, request ids) repeat from session to session, so a ``Last-Event-ID`` of one
    session could replay another's events.

    ``event_store_for(session_id)`` makes a session's store when the session is admitted;
    ``release(store)`` runs once the session is discarded (client ``DELETE``, idle timeout, crash,
    shutdown), perhaps more than once for one store. The manager's own ``event_store`` stays
    ``None``. Everything else is the stock manager's, with the stock constructor's keywords."""

    def __init__(
        self,
        app: Server[Any],
        event_store_for: Callable[[str], SdkEventStore],
        release: Callable[[SdkEventStore], Awaitable[None]],
        **stock_kwargs: Any,
    ) -> None:
        if stock_kwargs.get("stateless"):
            raise ValueError("a stateless manager has no sessions and stores no events")
        if "event_store" in stock_kwargs:
            raise TypeError("each session gets its store from event_store_for; pass no event_store")
        super().__init__(app, **stock_kwargs)
        self._event_store_for = event_store_for
        self._release = release

    def _admit_session(self, requestor: AuthorizationContext | None) -> StreamableHTTPServerTransport | None:
        transport = super()._admit_session(requestor)
        if transport is not None:  # not yet serving: its first request is still to come
            assert transport.mcp_session_id is not None
            transport._event_store = self._event_store_for(transport.mcp_session_id)  # pyright: ignore[reportPrivateUsage]
        return transport

    async def _discard_session(self, session_id: str, transport: StreamableHTTPServerTransport) -> None:
        await super()._discard_session(session_id, transport)
        store = transport._event_store  # pyright: ignore[reportPrivateUsage]
        if store is not None:
            with anyio.move_on_after(PER_SESSION_RELEASE_WITHIN, shield=True):
                await self._release(store)


async def serve_session(
    server: Server[Any],
    read_stream: ReadStream[SessionMessage | Exception],
    write_stream: WriteStream[SessionMessage],
    lifespan_state: Any,
    session_id: str,
) -> None:
    """One Streamable HTTP session's server run, as the SDK's manager drives it: the manager's
    lifespan, entered once, shared by every session."""
    await serve_loop(server, read_stream, write_stream, lifespan_state=lifespan_state, session_id=session_id)


# -- auth ----------------------------------------------------------------------------------------


def owner_fingerprint(scope: Scope) -> str:
    """A fingerprint of the request's credential ("" when anonymous): a session answers only the
    principal that opened it, on any worker: for the SDK's bearer auth, the principal its
    ``authorization_context`` names (client id, issuer, subject: a refreshed token with other
    scopes is the same principal); for any other Starlette authentication, the user's class and
    identity."""
    user = scope.get("user")
    if isinstance(user, AuthenticatedUser):
        principal: Any = authorization_context(user)
    elif isinstance(user, BaseUser) and user.is_authenticated:
        try:
            identity = user.identity
        except NotImplementedError:  # BaseUser's default: the display name is what it has
            identity = user.display_name
        principal = {"user": f"{type(user).__module__}.{type(user).__qualname__}", "identity": identity}
    else:
        return ""
    return hashlib.sha256(json.dumps(principal, sort_keys=True).encode()).hexdigest()


def user_token(scope: Scope) -> dict[str, Any] | None:
    """The SDK bearer token of the request's user, as JSON, for a worker to rebuild the user."""
    user = scope.get("user")
    return user.access_token.model_dump(mode="json") if isinstance(user, AuthenticatedUser) else None


def forwarded_user(token: dict[str, Any]) -> AuthenticatedUser:
    """The user :func:`user_token` describes."""
    return AuthenticatedUser(AccessToken.model_validate(token))


@contextmanager
def auth_context(scope: Scope) -> Iterator[None]:
    """The SDK's auth context for the request's user, as its ``AuthContextMiddleware`` sets it,
    for a POST handed over by another worker."""
    user = scope.get("user")
    token = auth_context_var.set(user) if isinstance(user, AuthenticatedUser) else None
    try:
        yield
    finally:
        if token is not None:
            auth_context_var.reset(token)


# -- server wiring -------------------------------------------------------------------------------


def server_wiring(
    server: MCPServer[Any] | Server[Any], sse_endpoint: ASGIApp, post_endpoint: ASGIApp
) -> tuple[ASGIApp, ASGIApp, list[BaseRoute], list[Middleware]]:
    """An ``MCPServer``'s auth settings and routes, wired as its own ``sse_app()`` does: the two
    endpoints (behind ``RequireAuthMiddleware`` when it verifies tokens), the routes to add after
    them (auth server, protected resource metadata, custom routes) and the app's middleware."""
    routes: list[BaseRoute] = []
    middleware: list[Middleware] = []
    if not isinstance(server, MCPServer):
        return sse_endpoint, post_endpoint, routes, middleware
    auth = server.settings.auth
    verifier = server._token_verifier
    if auth is not None and server._auth_server_provider is not None:
        routes += create_auth_routes(
            provider=server._auth_server_provider,
            issuer_url=auth.issuer_url,
            service_documentation_url=auth.service_documentation_url,
            client_registration_options=auth.client_registration_options,
            revocation_options=auth.revocation_options,
            identity_assertion_enabled=auth.identity_assertion_enabled,
        )
    if verifier is not None:
        resource_url = auth.resource_server_url if auth is not None else None
        middleware = [
            Middleware(
                AuthenticationMiddleware,
                backend=BearerAuthBackend(
                    verifier,
                    resource_server_url=resource_url if auth is not None and auth.validate_token_resource else None,
                ),
            ),
            Middleware(AuthContextMiddleware),
        ]
        metadata_url = build_resource_metadata_url(resource_url) if resource_url is not None else None
        scopes = (auth.required_scopes if auth is not None else None) or []
        sse_endpoint = RequireAuthMiddleware(sse_endpoint, scopes, metadata_url)
        post_endpoint = RequireAuthMiddleware(post_endpoint, scopes, metadata_url)
    if auth is not None and auth.resource_server_url is not None:
        routes += create_protected_resource_routes(
            resource_url=auth.resource_server_url,
            authorization_servers=[auth.issuer_url],
            scopes_supported=auth.required_scopes,
        )
    routes += server._custom_starlette_routes
    return sse_endpoint, post_endpoint, routes, middleware
