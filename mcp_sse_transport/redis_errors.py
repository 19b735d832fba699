"""The one mapping of Redis's failures onto :class:`~mcp_sse_transport.errors.StoreError`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import RedisError

from .errors import StoreError
from .ids import session_tag

__all__ = ["REDIS_FAILURES", "redis_errors", "store_error"]

REDIS_FAILURES = (RedisError, OSError)
"""What a Redis command raises when Redis refused it or could not be reached."""


def store_error(operation: str, session_id: str, exc: BaseException) -> StoreError:
    """``exc`` as a StoreError whose message never holds the whole session id (a bearer
    capability): some Redis errors echo the key."""
    tag = session_tag(session_id)
    detail = str(exc).replace(session_id, f"{tag}…") or type(exc).__name__
    return StoreError(f"{operation} for session {tag} failed: {detail}")


@contextmanager
def redis_errors(operation: str, session_id: str) -> Iterator[None]:
    """Raise what Redis raises inside as :func:`store_error`'s StoreError."""
    try:
        yield
    except REDIS_FAILURES as exc:
        raise store_error(operation, session_id, exc) from exc
