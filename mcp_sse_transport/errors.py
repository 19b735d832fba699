"""Exception types and the error codes the transport puts on the wire."""

from __future__ import annotations

from enum import IntEnum

import anyio

__all__ = [
    "ConnectionLostError",
    "ErrorCode",
    "EventTooLargeError",
    "FencedError",
    "GrantError",
    "SessionClosedError",
    "SessionExpiredError",
    "SlowConsumerError",
    "StoreError",
    "StoreUnavailableError",
]


class ErrorCode(IntEnum):
    """Codes of ``event: error`` bodies and of the JSON-RPC errors the transport writes.

    The two standard JSON-RPC codes keep their meaning; the transport's own codes sit in the
    implementation-defined server range (-32000 to -32099), clear of the codes the MCP SDKs use
    (-32000 connection closed, -32001 request timeout, -32002 resource not found, -32020s, -32042).
    """

    PARSE_ERROR = -32700
    """A POSTed body is not valid JSON-RPC; the POST itself also gets 400."""
    INVALID_REQUEST = -32600
    """A POSTed body is JSON with an ``id`` but not a valid message: that id gets this error."""
    INTERNAL_ERROR = -32603
    """An outbound message could not be serialized; a response it replaced gets this code too."""
    SLOW_CONSUMER = -32050
    """The client did not read fast enough: the buffer stayed full past the grant timeout."""
    SERVER_SHUTDOWN = -32051
    """The server is shutting down; reconnect after the event's ``retry:`` delay."""
    RESUME_UNKNOWN = -32052
    """``Last-Event-ID`` names no session this server can resume (unknown, expired, malformed, or
    another credential's): over legacy SSE a new session starts on the same stream; over
    Streamable HTTP (no stream of the session) the GET gets 400 with this JSON-RPC error."""
    RESUME_GAP = -32053
    """Events after ``Last-Event-ID`` were trimmed from the replay log: what is retained follows."""
    SUPERSEDED = -32054
    """Another connection resumed this session; this stream ends."""
    REQUEST_INTERRUPTED = -32055
    """The request's answer was lost with what carried it, and it may or may not have taken
    effect: the worker serving the session died and another took it over (legacy SSE), or the
    request's Streamable HTTP response stream broke (cut loose) before its answer."""
    STORE_UNAVAILABLE = -32056
    """The event store (Redis) failed, so the event could not be kept for replay: the session ends."""
    MESSAGE_TOO_LARGE = -32057
    """An outbound message is larger than ``max_event_bytes`` (the replay log could not keep it):
    it is not sent; a response it replaced gets this code too. The session goes on."""


class SlowConsumerError(anyio.BrokenResourceError):
    """The session was cut loose because its client did not keep up.

    A subclass of :class:`anyio.BrokenResourceError`, which is what the SDK's dispatcher expects
    from a write stream whose peer is gone.
    """


class ConnectionLostError(anyio.BrokenResourceError):
    """The client disconnected, or a write to it stalled past the write timeout."""


class SessionExpiredError(anyio.BrokenResourceError):
    """The session's connection dropped and no resume came within ``session_grace``."""


class SessionClosedError(anyio.ClosedResourceError):
    """The session was closed on this side (``close``, ``send_error`` or server shutdown)."""


class StoreUnavailableError(anyio.BrokenResourceError):
    """The session ended because its event store failed: an event could not be kept for replay."""


class EventTooLargeError(ValueError):
    """An event is larger than ``max_event_bytes``: refused before it is granted, the session
    going on (granted, it could not be kept for replay)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"an event of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class GrantError(RuntimeError):
    """An event was sent without a valid grant: none, a spent one, another session's, or too small."""


class StoreError(Exception):
    """The event store or session directory could not be reached or failed (Redis down, say).

    The store's own exception is the ``__cause__``. ``transient`` failures (the default: a
    connection refused, a command timed out) may succeed when tried again; others will not.
    """

    transient: bool = True


class FencedError(StoreError):
    """This worker no longer holds the session's lease: another worker took the session over
    (its generation in Redis moved on), or this worker's own lease lapsed before a renewal was
    granted. Redis refused the write (or it was refused before being sent): the session is served
    elsewhere now, and this worker must stop serving it without touching its state in Redis."""

    transient = False
