"""Event ids: the session's id, its resume secret, then the store's token.

An id alone leads back to its session (the legacy GET URL carries no session id, and a
browser's EventSource resends only the id), and only the stream itself ever carried the secret:
the session id is in the POST URL (access logs, proxies, browser history), so it alone must not
read the stream. Ids without the secret, or with another one, are refused as unknown.
"""

from __future__ import annotations

import hmac
import re
import secrets
from typing import NamedTuple

__all__ = [
    "MAX_REQUEST_ID_BYTES",
    "SEEN_REQUEST_IDS",
    "EventId",
    "event_id_prefix",
    "format_event_id",
    "new_secret",
    "parse_event_id",
    "secret_matches",
    "session_tag",
]

SEEN_REQUEST_IDS = 10_000
"""Request ids a session remembers, to recognise a POST the client sent again because it could
not tell whether the first arrived (MCP forbids reusing a request id within a session). Past
this many, the oldest is forgotten (with Redis, one at random). With ids of at most
:data:`MAX_REQUEST_ID_BYTES`, the memory is at most about 2.5 MiB per session."""

MAX_REQUEST_ID_BYTES = 256
"""The longest request id a session accepts, as JSON (a string id counts its quotes). The SDKs
send integers, other clients UUIDs (38 bytes); a DNS name is at most 253. A longer id gets a
JSON-RPC error and is never remembered."""

_EVENT_ID = re.compile(r"([0-9a-f]{32})\.([0-9a-f]{32}):([0-9A-Za-z._-]{1,64})")


class EventId(NamedTuple):
    """A parsed event id."""

    session_id: str
    token: str
    """The store's token: the part after the colon."""
    secret: str
    """The session's resume secret: compare it with :func:`secret_matches`, never ``==``."""


def session_tag(session_id: str) -> str:
    """The part of a session id that may appear in logs and statistics (the id is a capability)."""
    return session_id[:8]


def new_secret() -> str:
    """A fresh resume secret: 128 random bits, as hex."""
    return secrets.token_hex(16)


def event_id_prefix(session_id: str, secret: str) -> str:
    """What every event id of the session starts with; the token follows."""
    return f"{session_id}.{secret}:"


def format_event_id(session_id: str, token: str, secret: str) -> str:
    return f"{session_id}.{secret}:{token}"


def parse_event_id(value: str) -> EventId | None:
    """The parts of a well-formed id, else ``None`` (empty, malformed, oversized, or of the
    older form without a secret)."""
    match = _EVENT_ID.fullmatch(value)
    return EventId(match.group(1), match.group(3), match.group(2)) if match else None


def secret_matches(given: str, expected: str) -> bool:
    """Whether an id's secret is the session's, in constant time."""
    return hmac.compare_digest(given.encode(), expected.encode())
