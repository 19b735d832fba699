"""Every knob of the transport, in one frozen object with production-safe defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["SlowConsumerPolicy", "SseConfig"]

SlowConsumerPolicy = Literal["block", "disconnect"]


@dataclass(frozen=True, slots=True)
class SseConfig:
    """Limits and timings of a session's event stream. The README's config table explains each."""

    max_buffered_events: int = 1000
    """Events a session may hold unsent. Mercure buffers 1,000 updates per subscriber."""

    max_buffered_bytes: int = 4 * 1024 * 1024
    """Payload bytes a session may hold unsent (4 MiB, the SDK's request body limit). One event
    larger than this is still granted when the buffer is empty, so no message is unsendable."""

    max_event_bytes: int = 4 * 1024 * 1024
    """The largest event a session sends, in payload bytes: the SDK's request body limit, so a
    message may be as large as the largest request. Must fit the replay log
    (``replay_max_bytes``); a larger outbound message is refused with ``MESSAGE_TOO_LARGE``
    (a response is replaced by a JSON-RPC error), since it could never be replayed."""

    max_request_id_bytes: int = 256
    """The longest request id accepted, as JSON. The SDKs send integers, other clients UUIDs (38
    bytes); a DNS name is at most 253. A POST with a longer id gets 400 and a JSON-RPC error
    (``INVALID_REQUEST``), and the id is never remembered: the memory of request ids a session
    keeps (10,000, to run a request POSTed twice once) is bounded in bytes by this."""

    grant_timeout: float = 10.0
    """Seconds a producer may wait for room before the session is ended as a slow consumer.
    Mercure gives a subscriber 5 s per update; a response may queue behind others, so twice that."""

    slow_consumer_policy: SlowConsumerPolicy = "block"
    """``"block"``: producers wait up to ``grant_timeout`` for room, then the session ends.
    ``"disconnect"``: the session ends as soon as a producer finds the buffer full."""

    write_timeout: float = 10.0
    """Seconds one write to the connection may stall before the connection is declared dead.
    Mercure's per-update dispatch timeout is 5 s; nginx's ``send_timeout`` is 60 s."""

    heartbeat_interval: float = 15.0
    """Seconds of silence after which a ``: ping`` comment is written. The MCP spec advises
    keep-alives and the TypeScript and Go SDKs and sse-starlette use 15 s; proxies commonly cut
    idle streams at 30 to 60 s."""

    drain_timeout: float = 5.0
    """Seconds ``close``, ``send_error`` and server shutdown give buffered events to drain."""

    retry_interval: float = 3.0
    """Seconds a client should wait before reconnecting, sent as ``retry:`` with the stream's
    first event and with the shutdown event. Browsers' EventSource default is about 3 s."""

    session_grace: float = 30.0
    """Seconds a session outlives its connection, waiting for a resume. Events produced meanwhile
    stay within the buffer limits. ``0`` ends a session with its connection, as stock does."""

    replay_max_events: int = 2000
    """Events the replay log keeps per session: the buffer's worth, and as much again for events
    that were written but never reached a client whose connection dropped. At least
    ``max_buffered_events``: a smaller log would turn buffered events into a gap on resume."""

    replay_max_bytes: int = 8 * 1024 * 1024
    """Payload bytes the in-memory replay log keeps per session: twice the buffer's limit. At
    least ``max_buffered_bytes`` and ``max_event_bytes``, for the same reason."""

    replay_max_age: float = 300.0
    """Seconds the in-memory replay log keeps an event: ten times the grace period."""

    max_sessions: int | None = 10_000
    """Sessions open at once, detached ones included; a GET that would open one more gets 503
    "Too many open sessions" (with ``Retry-After``) and no open session is touched. The SDK's
    Streamable HTTP manager caps at the same 10,000. ``None``: no cap."""

    max_session_streams: int | None = 100
    """Streamable HTTP: response streams one session may have open, or ended and kept
    ``session_grace`` for a resume, at once (each its own buffer and replay log). HTTP/2 servers
    allow 100 to 128 concurrent streams per connection (RFC 9113 recommends at least 100; nginx
    ``http2_max_concurrent_streams`` 128). Past it, the oldest ended stream is forgotten first;
    with every one still open, a POSTed request gets 503 with ``Retry-After``. ``None``: no cap."""

    socket_send_buffer: int | None = 256 * 1024
    """Bytes of the kernel's send buffer (``SO_SNDBUF``) of an event stream's socket, set when
    the stream opens (never on a POST's); ``None`` leaves the kernel's autotuning. What a stalled
    client has in flight is the buffer plus this: Linux starts a socket at 16 KiB
    (``net.ipv4.tcp_wmem``) and autotunes it up to 4 MiB, that much again per stuck client; its
    ``net.core.wmem_default`` is 208 KiB, and nginx caps it with ``listen ... sndbuf=``. Linux
    doubles the value set (for its bookkeeping), within ``net.core.wmem_max``."""

    redis_url: str | None = None
    """Turns on scale-out: ``redis://host:port/db`` (or ``rediss://``, ``unix://``) of the Redis
    that every worker shares for events, the session directory and routing between workers.
    ``None`` keeps everything in this process. Needs the ``redis`` extra."""

    redis_prefix: str = "mcp-sse:"
    """Prefix of every Redis key and channel, so several deployments can share one Redis."""

    owner_lease: float = 5.0
    """Seconds a worker's claim on a session lasts unless renewed (every third of it). A dead
    worker's sessions are taken over once it runs out. Kubernetes leader election renews a 15 s
    lease every 2 s; a session is cheaper to move, so a shorter lease means a shorter outage."""

    forward_timeout: float = 3.0
    """Seconds a worker waits for a session's owner to take a forwarded POST (or, if the owner is
    gone, for its lease to run out) before answering 503. Below the SDK client's 5 s HTTP timeout,
    so the client sees our 503, not its own timeout."""

    def __post_init__(self) -> None:
        for name in (
            "max_buffered_events",
            "max_buffered_bytes",
            "max_event_bytes",
            "max_request_id_bytes",
            "replay_max_events",
            "replay_max_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "grant_timeout",
            "write_timeout",
            "heartbeat_interval",
            "drain_timeout",
            "replay_max_age",
            "owner_lease",
            "forward_timeout",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name in ("retry_interval", "session_grace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
        for log, least in (
            ("replay_max_events", "max_buffered_events"),
            ("replay_max_bytes", "max_buffered_bytes"),
            ("replay_max_bytes", "max_event_bytes"),
        ):
            if getattr(self, log) < getattr(self, least):
                raise ValueError(
                    f"{log} ({getattr(self, log)}) must be at least {least} ({getattr(self, least)}): "
                    "the replay log must keep what the buffer holds"
                )
        for name in ("max_sessions", "max_session_streams", "socket_send_buffer"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.redis_url is not None and (not isinstance(self.redis_url, str) or "://" not in self.redis_url):
            raise ValueError(f"redis_url must be a URL such as redis://127.0.0.1:6379/0, got {self.redis_url!r}")
        if not isinstance(self.redis_prefix, str) or not self.redis_prefix:
            raise ValueError(f"redis_prefix must be a non-empty string, got {self.redis_prefix!r}")
        if self.slow_consumer_policy not in ("block", "disconnect"):
            raise ValueError(f"slow_consumer_policy must be 'block' or 'disconnect', got {self.slow_consumer_policy!r}")

    @property
    def retry_after(self) -> dict[str, str]:
        """The ``Retry-After`` header of a 503: ``retry_interval`` in whole seconds, at least one."""
        return {"Retry-After": str(max(1, round(self.retry_interval)))}

    @property
    def retry_ms(self) -> int:
        """``retry_interval`` as the SSE ``retry:`` field wants it."""
        return round(self.retry_interval * 1000)
