"""Helpers for tests that drive a session handler without sockets."""

from __future__ import annotations

import httpx2

from mcp_sse_transport import SseConfig

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


def parse(data: bytes) -> list[httpx2.ServerSentEvent]:
    """Events as the SDK's client parser (httpx2's) reads them."""
    response = httpx2.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=data,
        request=httpx2.Request("GET", "http://testserver/sse"),
    )
    return list(httpx2.EventSource(response))
