"""mcp 2.x, as the rest of the package needs it: ``mcp_types``, context-carrying streams,
messages as the concrete JSON-RPC classes, ``serve_loop`` and the manager's shared lifespan."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx2 as httpx
import mcp_types as types
from mcp.server.auth.middleware.bearer_auth import AuthorizationContext, authorization_context
from mcp.server.auth.routes import create_auth_routes
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
from mcp.server.transport_security import DEFAULT_MAX_REQUEST_BODY_SIZE, RequestBodyLimitMiddleware
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
from starlette.requests import Request
from starlette.routing import BaseRoute

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

STOCK_MANAGER_LIMITS = True
"""The SDK's manager takes ``max_request_body_size`` (and its session limits)."""

Inbound = ContextSendStream[SessionMessage | Exception]
"""The sending end of an SDK server's read stream."""

Message = types.JSONRPCMessage
"""A JSON-RPC message: one of the four concrete classes."""


def sdk_lowlevel_server(server: MCPServer[Any] | Server[Any]) -> Server[Any]:
    """The lowlevel ``Server`` that runs a session, of an ``MCPServer`` or itself."""
    return server._lowlevel_server if isinstance(server, MCPServer) else server


def sdk_message(message: Message) -> Message:
    """A message as the SDK's code takes it (its streams, its event store's replay): itself."""
    return message


def message_of(item: SessionMessage) -> Message:
    """The JSON-RPC message an SDK stream item carries."""
    return item.message


def sender_context(stream: ContextReceiveStream[Any]) -> contextvars.Context | None:
    """The context the last item read from ``stream`` was sent in (2.x's context streams carry it)."""
    return stream.last_context


def parse(body: bytes | str) -> Message:
    """A POSTed JSON-RPC message; raises :class:`ValidationError` when it is not one."""
    return types.jsonrpc_message_adapter.validate_json(body, by_name=False)


def serialize(message: Message) -> bytes:
    """Bytes straight from pydantic-core: what ``model_dump_json`` does, without the str round
    trip. Raises ValueError or TypeError for a message that cannot be serialized."""
    return message.__pydantic_serializer__.to_json(message, by_alias=True, exclude_unset=True)


def dump(message: Message) -> str:
    return message.model_dump_json(by_alias=True, exclude_unset=True)


def speaks_handshake(version: str) -> bool:
    """Whether the SDK negotiates ``version`` through ``initialize``."""
    return version in HANDSHAKE_PROTOCOL_VERSIONS


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


def auth_server_routes(provider: Any, auth: Any) -> Sequence[BaseRoute]:
    """The OAuth authorization server's routes of an ``MCPServer`` that is its own, as its ``sse_app()`` adds them."""
    return create_auth_routes(
        provider=provider,
        issuer_url=auth.issuer_url,
        service_documentation_url=auth.service_documentation_url,
        client_registration_options=auth.client_registration_options,
        revocation_options=auth.revocation_options,
        identity_assertion_enabled=auth.identity_assertion_enabled,
    )
