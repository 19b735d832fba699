"""mcp 1.x, as the rest of the package needs it: ``mcp.types``, plain anyio memory streams,
messages wrapped in the ``JSONRPCMessage`` root model on the SDK's streams and serialized
without ``None`` fields, a ``Server.run`` that enters the server's lifespan for each session.

The floor is mcp 1.24; what later 1.x releases added (the request body limit, the session
manager's limits, redirect-following HTTP helpers, the principal of a token) is used where
present, and where absent replaced by the smallest equivalent, each named below."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any, cast

import anyio
import httpx
import mcp.types as types
from anyio.streams.memory import MemoryObjectReceiveStream as ContextReceiveStream
from anyio.streams.memory import MemoryObjectSendStream as ContextSendStream
from httpx_sse import EventSource, aconnect_sse
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.routes import create_auth_routes
from mcp.server.fastmcp import FastMCP as MCPServer
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http import (
    LAST_EVENT_ID_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    MCP_SESSION_ID_HEADER,
    StreamableHTTPServerTransport,
)
from mcp.server.streamable_http import EventMessage as SdkEventMessage
from mcp.server.streamable_http import EventStore as SdkEventStore
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager as StockSessionManager
from mcp.shared._httpx_utils import McpHttpClientFactory, create_mcp_http_client
from mcp.shared.message import CloseSSEStreamCallback, ServerMessageMetadata, SessionMessage
from mcp.shared.version import SUPPORTED_PROTOCOL_VERSIONS
from mcp.types import DEFAULT_NEGOTIATED_VERSION
from starlette.requests import Request
from starlette.routing import BaseRoute

try:  # mcp 1.28 on
    from mcp.server.auth.middleware.bearer_auth import AuthorizationContext, authorization_context
except ImportError:  # pragma: no cover (mcp 1.24 to 1.27)
    AuthorizationContext = dict[str, Any]  # type: ignore[misc,assignment]

    def authorization_context(user: AuthenticatedUser) -> AuthorizationContext:
        """The token's client, the principal the SDK's later releases name."""
        return {"client_id": user.access_token.client_id}  # type: ignore[typeddict-item]


try:  # mcp 1.28 on
    from mcp.server.streamable_http_manager import DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_IDLE_TIMEOUT
    from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE, RequestBodyLimitMiddleware

    STOCK_MANAGER_LIMITS = True
    """The SDK's manager takes ``max_request_body_size`` (and its session limits)."""
except ImportError:  # pragma: no cover (mcp 1.24 to 1.27)
    STOCK_MANAGER_LIMITS = False
    from ._body_limit import DEFAULT_MAX_REQUEST_BODY_SIZE, RequestBodyLimitMiddleware  # type: ignore[assignment]

    DEFAULT_MAX_SESSIONS = 10_000  # type: ignore[misc]  # the values mcp 1.28 and 2.x chose
    DEFAULT_SESSION_IDLE_TIMEOUT = 30 * 60  # type: ignore[misc]

try:  # mcp 1.28 on
    from mcp.shared._httpx_utils import request_within_origin
    from mcp.shared._httpx_utils import sse_within_origin as _sdk_sse_within_origin
except ImportError:  # pragma: no cover (mcp 1.24 to 1.27: its transports follow no redirect)

    async def request_within_origin(
        client: httpx.AsyncClient, method: str, url: httpx.URL | str, **kwargs: Any
    ) -> httpx.Response:
        return await client.request(method, url, **kwargs)

    def _sdk_sse_within_origin(  # type: ignore[misc]
        client: httpx.AsyncClient, url: httpx.URL | str, *, headers: dict[str, str] | None = None
    ) -> AbstractAsyncContextManager[EventSource]:
        return aconnect_sse(client, "GET", str(url), headers=dict(headers or {}))


__all__ = [
    "DEFAULT_MAX_REQUEST_BODY_SIZE",
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_NEGOTIATED_VERSION",
    "DEFAULT_SESSION_IDLE_TIMEOUT",
    "LAST_EVENT_ID_HEADER",
    "MCP_PROTOCOL_VERSION_HEADER",
    "MCP_SESSION_ID_HEADER",
    "REQUEST_CANCELLED",
    "STOCK_MANAGER_LIMITS",
    "AuthorizationContext",
    "ContextReceiveStream",
    "ContextSendStream",
    "Inbound",
    "MCPServer",
    "McpHttpClientFactory",
    "Message",
    "ReadStream",
    "RequestBodyLimitMiddleware",
    "SdkEventMessage",
    "SdkEventStore",
    "Server",
    "ServerMessageMetadata",
    "SessionMessage",
    "StockSessionManager",
    "StreamableHTTPServerTransport",
    "WriteStream",
    "accepts",
    "auth_server_routes",
    "authorization_context",
    "create_context_streams",
    "create_mcp_http_client",
    "dump",
    "handshake_era",
    "httpx",
    "lifespan",
    "message_of",
    "metadata",
    "parse",
    "primes_streams",
    "request_within_origin",
    "sdk_lowlevel_server",
    "sdk_message",
    "sender_context",
    "serialize",
    "serve_session",
    "speaks_handshake",
    "sse_within_origin",
    "types",
]

REQUEST_CANCELLED = 0
"""The code mcp 1.x answers a cancelled request with, itself (2.x leaves it to the transport)."""

ReadStream = ContextReceiveStream
WriteStream = ContextSendStream
create_context_streams = anyio.create_memory_object_stream

Inbound = ContextSendStream[SessionMessage | Exception]
"""The sending end of an SDK server's read stream."""

Message = types.JSONRPCRequest | types.JSONRPCNotification | types.JSONRPCResponse | types.JSONRPCError
"""A JSON-RPC message: one of the four concrete classes (on the SDK's streams, wrapped)."""


def sdk_lowlevel_server(server: MCPServer | Server[Any]) -> Server[Any]:
    """The lowlevel ``Server`` that runs a session, of a ``FastMCP`` or itself."""
    return server._mcp_server if isinstance(server, MCPServer) else server


def sdk_message(message: Message) -> types.JSONRPCMessage:
    """A message as the SDK's code takes it (its streams, its event store's replay): in its root model."""
    return types.JSONRPCMessage(message)


def message_of(item: SessionMessage) -> Message:
    """The JSON-RPC message an SDK stream item carries."""
    return item.message.root


def sender_context(stream: ContextReceiveStream[Any]) -> contextvars.Context | None:
    """None: mcp 1.x's memory streams carry no context."""
    return None


def parse(body: bytes | str) -> Message:
    """A POSTed JSON-RPC message; raises :class:`ValidationError` when it is not one."""
    return types.JSONRPCMessage.model_validate_json(body).root


def serialize(message: Message) -> bytes:
    """Bytes straight from pydantic-core, as mcp 1.x's ``model_dump_json(by_alias=True,
    exclude_none=True)`` has them. Raises ValueError or TypeError for a message that cannot be
    serialized."""
    return message.__pydantic_serializer__.to_json(message, by_alias=True, exclude_none=True)


def dump(message: Message) -> str:
    return message.model_dump_json(by_alias=True, exclude_none=True)


def speaks_handshake(version: str) -> bool:
    """Whether the SDK negotiates ``version`` through ``initialize``: every version 1.x knows."""
    return version in SUPPORTED_PROTOCOL_VERSIONS


def metadata(
    request: Request,
    on_unanswered: Callable[[], Awaitable[None]] | None = None,
    *,
    close_stream: CloseSSEStreamCallback | None = None,
    close_standalone: CloseSSEStreamCallback | None = None,
    can_send_request: bool = True,
) -> ServerMessageMetadata:
    """A POSTed message's metadata: its HTTP request and the callbacks behind
    ``ctx.close_sse_stream()``. mcp 1.x answers every request, cancelled ones too, and any
    channel may carry server requests: ``on_unanswered`` and ``can_send_request`` have no use."""
    return ServerMessageMetadata(
        request_context=request, close_sse_stream=close_stream, close_standalone_sse_stream=close_standalone
    )


def handshake_era(version: str | None) -> bool:
    """Whether a Streamable HTTP request with this ``MCP-Protocol-Version`` belongs to this
    library's sessions: always, on mcp 1.x, which has no other era (the SDK's own manager would
    open a session of its own for a version it does not know, outside our limits)."""
    return True


def primes_streams(version: str) -> bool:
    """Whether a client at ``version`` gets a priming event first on each POST stream, and may
    have its streams closed for polling: 2025-11-25 on, as the SDK decides."""
    return version >= "2025-11-25"


def accepts(request: Request) -> tuple[bool, bool]:
    """Whether the request's ``Accept`` takes JSON, and event streams, as the SDK reads it (its
    transport's check, which reads nothing of the transport)."""
    return StreamableHTTPServerTransport._check_accept_headers(cast(Any, None), request)


def lifespan(server: Server[Any]) -> AbstractAsyncContextManager[Any]:
    """Nothing: mcp 1.x's ``Server.run`` enters the server's lifespan for each session."""
    return nullcontext()


async def serve_session(
    server: Server[Any],
    read_stream: ReadStream[SessionMessage | Exception],
    write_stream: WriteStream[SessionMessage],
    lifespan_state: Any,
    session_id: str,
) -> None:
    """One Streamable HTTP session's server run, as mcp 1.x's manager runs it."""
    await server.run(read_stream, write_stream, server.create_initialization_options(), stateless=False)


@asynccontextmanager
async def sse_within_origin(
    client: httpx.AsyncClient,
    url: httpx.URL | str,
    *,
    headers: dict[str, str] | None = None,
    max_event_size: int | None = None,
) -> AsyncIterator[_Events]:
    """The SDK's event stream (httpx-sse), as 2.x's helper yields it: iterable events, its
    response. httpx-sse has no size limit: an event whose data is over ``max_event_size``
    raises once it is whole."""
    async with _sdk_sse_within_origin(client, url, headers=headers) as source:
        yield _Events(source, max_event_size)


class _Events:
    def __init__(self, source: EventSource, max_event_size: int | None) -> None:
        self.response = source.response
        self._source = source
        self._max = max_event_size

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for event in self._source.aiter_sse():
            if self._max is not None and len(event.data.encode()) > self._max:
                raise httpx.DecodingError(f"Server-sent event exceeded the {self._max} byte limit.")
            yield event


def auth_server_routes(provider: Any, auth: Any) -> Sequence[BaseRoute]:
    """The OAuth authorization server's routes of a ``FastMCP`` that is its own, as its
    ``sse_app()`` adds them."""
    return create_auth_routes(
        provider=provider,
        issuer_url=auth.issuer_url,
        service_documentation_url=auth.service_documentation_url,
        client_registration_options=auth.client_registration_options,
        revocation_options=auth.revocation_options,
    )
