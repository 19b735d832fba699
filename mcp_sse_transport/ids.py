"""Event ids: the session's id, then the store's token, so an id alone leads back to its session
(the legacy GET URL carries no session id, and a browser's EventSource resends only the id)."""

from __future__ import annotations

import re

__all__ = ["SEEN_REQUEST_IDS", "format_event_id", "parse_event_id"]

SEEN_REQUEST_IDS = 10_000
"""Request ids a session remembers, to recognise a POST the client sent again because it could
not tell whether the first arrived (MCP forbids reusing a request id within a session). Past
this many, the oldest is forgotten (with Redis, one at random)."""

_EVENT_ID = re.compile(r"([0-9a-f]{32}):([0-9A-Za-z._-]{1,64})")


def format_event_id(session_id: str, token: str) -> str:
    return f"{session_id}:{token}"


def parse_event_id(value: str) -> tuple[str, str] | None:
    """``(session_id, token)`` of a well-formed id, else ``None`` (empty, malformed, oversized)."""
    match = _EVENT_ID.fullmatch(value)
    return (match.group(1), match.group(2)) if match else None
