"""Flow-controlled, resumable-by-design Server-Sent Events transport for the Python MCP SDK.

A drop-in for ``mcp.server.sse.SseServerTransport`` whose sessions have bounded buffers,
write deadlines, heartbeats, structured error events and a graceful shutdown.
"""

from .config import SlowConsumerPolicy, SseConfig
from .errors import ConnectionLostError, ErrorCode, GrantError, SessionClosedError, SlowConsumerError
from .events import encode_comment, encode_error, encode_event
from .flow import CreditLedger, Grant, GrantState
from .handler import SessionHandler, SessionState, SessionStatistics
from .registry import RegistryStatistics, SessionRegistry
from .serving import H11Protocol, run, sse_app, uvicorn_server
from .transport import RequestRejected, SseServerTransport

__all__ = [
    "ConnectionLostError",
    "CreditLedger",
    "ErrorCode",
    "Grant",
    "GrantError",
    "GrantState",
    "H11Protocol",
    "RegistryStatistics",
    "RequestRejected",
    "SessionClosedError",
    "SessionHandler",
    "SessionRegistry",
    "SessionState",
    "SessionStatistics",
    "SlowConsumerError",
    "SlowConsumerPolicy",
    "SseConfig",
    "SseServerTransport",
    "encode_comment",
    "encode_error",
    "encode_event",
    "run",
    "sse_app",
    "uvicorn_server",
]

__version__ = "0.1.0"
