"""Configs whose timers stay out of the way unless a test sets them."""

from __future__ import annotations

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
