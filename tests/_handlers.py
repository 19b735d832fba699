"""Helpers for tests that drive a session handler without sockets."""

from __future__ import annotations

from mcp_sse_transport import SseConfig

from ._sdk_compat import ServerSentEvent, httpx, sse_events

NEVER = 60.0
"""Longer than any bounded test runs: a timer set to it never fires."""


def quiet_config(**overrides: object) -> SseConfig:
    values: dict[str, object] = {
        "grant_timeout": NEVER,
        "write_timeout": NEVER,
        "heartbeat_interval": NEVER,
        "drain_timeout": NEVER,
        "session_grace": NEVER,
    }
    values.update(overrides)
    return SseConfig(**values)  # type: ignore[arg-type]


def parse(data: bytes) -> list[ServerSentEvent]:
    """Events as the SDK's client parser (httpx2's; httpx-sse's on mcp 1.x) reads them."""
    response = httpx.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=data,
        request=httpx.Request("GET", "http://testserver/sse"),
    )
    return sse_events(response)
