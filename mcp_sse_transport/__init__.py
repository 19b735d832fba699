"""A flow-controlled, resumable Server-Sent Events transport for the Python MCP SDK.

A drop-in for ``mcp.server.sse.SseServerTransport`` whose sessions have bounded buffers, write
deadlines, heartbeats, structured error events, resumption by ``Last-Event-ID`` and a graceful
shutdown. The resuming client transport is in :mod:`mcp_sse_transport.client`.
"""

from .config import SlowConsumerPolicy, SseConfig
from .errors import (
    ConnectionLostError,
    ErrorCode,
    EventTooLargeError,
    GrantError,
    SessionClosedError,
    SessionExpiredError,
    SlowConsumerError,
)
from .events import encode_comment, encode_error, encode_event
from .flow import CreditLedger, Grant, GrantState
from .handler import Attachment, SessionHandler
from .ids import EventId, format_event_id, parse_event_id
from .registry import RegistryStatistics, SessionRegistry
from .sdk_event_store import SessionScopedEventStore, scoped_stock_manager
from .serving import H11Protocol, Transport, run, sse_app, streamable_http_app, uvicorn_server
from .store import BEFORE_FIRST, EventStore, InMemoryEventStore, Replay, StoredEvent
from .stream_state import SessionState, SessionStatistics
from .streamable import StreamableHTTPSessionManager
from .transport import RequestRejected, SseServerTransport

__all__ = [
    "BEFORE_FIRST",
    "Attachment",
    "ConnectionLostError",
    "CreditLedger",
    "ErrorCode",
    "EventId",
    "EventStore",
    "EventTooLargeError",
    "Grant",
    "GrantError",
    "GrantState",
    "H11Protocol",
    "InMemoryEventStore",
    "RegistryStatistics",
    "Replay",
    "RequestRejected",
    "SessionClosedError",
    "SessionExpiredError",
    "SessionHandler",
    "SessionRegistry",
    "SessionScopedEventStore",
    "SessionState",
    "SessionStatistics",
    "SlowConsumerError",
    "SlowConsumerPolicy",
    "SseConfig",
    "SseServerTransport",
    "StoredEvent",
    "StreamableHTTPSessionManager",
    "Transport",
    "encode_comment",
    "encode_error",
    "encode_event",
    "format_event_id",
    "parse_event_id",
    "run",
    "scoped_stock_manager",
    "sse_app",
    "streamable_http_app",
    "uvicorn_server",
]

__version__ = "0.1.0"
