"""The one package that knows the MCP SDK: every import of it, and every version-specific detail.

Stream types, message (de)serialization, server wiring, auth context and the SDK's HTTP helpers
are reached through here. ``_v2`` holds what mcp 2.x spells its own way, ``_v1`` what mcp 1.x
does; this module picks the one of the installed SDK and adds what both share, so the rest of
the package never asks which major it runs on. Type checking reads the 2.x side.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
from mcp.server.transport_security import TransportSecurityMiddleware as TransportSecurityMiddleware
from mcp.server.transport_security import TransportSecuritySettings as TransportSecuritySettings
from mcp.shared.message import CloseSSEStreamCallback as CloseSSEStreamCallback
from mcp.shared.message import MessageMetadata
from pydantic import ValidationError as ValidationError
from starlette.authentication import BaseUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Scope

from ._fastmcp import fastmcp_lifespan, fastmcp_wiring, is_fastmcp
from ._major import MAJOR as MAJOR
from ._major import VERSION as VERSION

if TYPE_CHECKING or MAJOR >= 2:
    from ._v2 import *
else:  # pragma: no cover (the 1.x environment's run covers it)
    from ._v1 import *

Served = Any
"""What the front ends serve: an mcp 2.x ``MCPServer``, an mcp 1.x ``FastMCP``, a
``fastmcp.FastMCP`` (3.x or 4.x), or a lowlevel ``Server`` of either major."""

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


# -- messages ------------------------------------------------------------------------------------


def session_message(message: Message, metadata: MessageMetadata = None) -> SessionMessage:
    """A message as the SDK's streams carry it."""
    return SessionMessage(sdk_message(message), metadata=metadata)


def jsonrpc_error(request_id: types.RequestId, message: str, code: int) -> types.JSONRPCError:
    return types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))


def answered_id(message: Message) -> types.RequestId | None:
    """The id a response or error answers; ``None`` for requests and notifications."""
    return message.id if isinstance(message, types.JSONRPCResponse | types.JSONRPCError) else None


def restored_handshake(version: str) -> tuple[types.JSONRPCRequest, types.JSONRPCNotification]:
    """The ``initialize`` and ``notifications/initialized`` of a restored session: the client's
    protocol version; no capabilities (the server must not ask it for roots, sampling or
    elicitation it may not have); a client info that says the session was restored."""
    client_info = {"name": "mcp-sse-transport-restored-session", "version": "0"}
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": client_info}
    initialize = types.JSONRPCRequest(jsonrpc="2.0", id=RESTORED_REQUEST_ID, method="initialize", params=params)
    return initialize, types.JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized")


def related_request_id(item: SessionMessage) -> types.RequestId | None:
    """The client request a server's outbound message belongs to (its progress, its logs, its
    own requests), if the server said."""
    meta = item.metadata
    return meta.related_request_id if isinstance(meta, ServerMessageMetadata) else None


# -- Streamable HTTP: the SDK's manager -----------------------------------------------------------


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
        if not hasattr(StockSessionManager, "_admit_session"):
            raise RuntimeError(f"a session manager with a store per session needs mcp>=1.28 (this is mcp {VERSION})")
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


def _validates_resource(auth: Any) -> bool:
    """``AuthSettings.validate_token_resource`` (mcp 1.28 and 2.x; before, tokens name no resource)."""
    return bool(getattr(auth, "validate_token_resource", False))


def _bearer_backend(verifier: Any, resource_server_url: Any) -> BearerAuthBackend:
    """The SDK's bearer backend, checking the token's resource where the SDK can (1.28 on)."""
    if resource_server_url is None:
        return BearerAuthBackend(verifier)
    return BearerAuthBackend(verifier, resource_server_url=resource_server_url)


def stock_manager(app: Server[Any], **kwargs: Any) -> StockSessionManager:
    """The SDK's session manager; mcp before 1.28 has no body limit of its own (ours is in front
    of it), so it is not given one."""
    if not STOCK_MANAGER_LIMITS:
        kwargs.pop("max_request_body_size", None)
    return StockSessionManager(app, **kwargs)


def lowlevel_server(server: Served) -> Server[Any]:
    """The lowlevel ``Server`` that runs a session of ``server``."""
    return server._mcp_server if is_fastmcp(server) else sdk_lowlevel_server(server)


def app_lifespan(server: Served) -> AbstractAsyncContextManager[Any]:
    """What the framework's own app enters once around all its sessions (fastmcp: its lifespan
    manager); the SDK's servers enter theirs per session (1.x) or per manager (2.x)."""
    return fastmcp_lifespan(server) if is_fastmcp(server) else nullcontext()


def app_state(server: Served, transport: str, path: str) -> dict[str, Any]:
    """What the framework's code reads off ``app.state``, as its own app sets it (fastmcp: the
    transport's name, the server, its auth provider, which its component manager's routes
    check, and the endpoint's path)."""
    if not is_fastmcp(server):
        return {}
    return {"transport_type": transport, "fastmcp_server": server, "fastmcp_auth": server.auth, "path": path}


def server_wiring(
    server: Served,
    sse_endpoint: ASGIApp,
    post_endpoint: ASGIApp,
    sse_path: str = "/sse",
    message_path: str = "/messages/",
) -> tuple[ASGIApp, ASGIApp, list[BaseRoute], list[Middleware]]:
    """A server's auth settings and routes, wired as its framework's own SSE app does: the two
    endpoints (behind ``RequireAuthMiddleware`` when it verifies tokens), the routes to add after
    them (auth server, protected resource metadata, custom routes) and the app's middleware.
    ``sse_path`` and ``message_path`` are where the endpoints are served (fastmcp names them in
    its auth metadata)."""
    if is_fastmcp(server):
        return fastmcp_wiring(server, sse_path, message_path, sse_endpoint, post_endpoint)
    routes: list[BaseRoute] = []
    middleware: list[Middleware] = []
    if not isinstance(server, MCPServer):
        return sse_endpoint, post_endpoint, routes, middleware
    auth = server.settings.auth
    verifier = server._token_verifier
    if auth is not None and server._auth_server_provider is not None:
        routes += auth_server_routes(server._auth_server_provider, auth)
    if verifier is not None:
        resource_url = auth.resource_server_url if auth is not None else None
        middleware = [
            Middleware(
                AuthenticationMiddleware,
                backend=_bearer_backend(
                    verifier, resource_url if auth is not None and _validates_resource(auth) else None
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
