"""The order of a session's resumes, without clocks.

When resumes of one session race (a client's reconnect and its dropped connection's, on one
worker or on several), the last to *arrive* wins. "Last" is a number drawn from a
:class:`ClaimSequence` as the resume arrives: a counter in this process without Redis, one
counter per session in Redis with it (``INCR``, which every worker shares). No worker's wall
clock takes part: a clock stepped back, or skewed between hosts, cannot reorder resumes.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["ClaimSequence", "LocalClaimSequence", "RedisClaimSequence"]


class ClaimSequence(Protocol):
    """Where a resume's place in line comes from."""

    async def next(self, session_id: str) -> int:
        """A number greater than any this source gave for ``session_id`` before. Raises
        :class:`~mcp_sse_transport.errors.StoreError` when it cannot be drawn."""
        ...


class LocalClaimSequence:
    """One process's counter: enough when every resume reaches this process."""

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    async def next(self, session_id: str) -> int:
        return next(self._counter)


_NEXT = """
if redis.call('exists', KEYS[2]) == 0 then return 0 end
local n = redis.call('incr', KEYS[1])
redis.call('pexpire', KEYS[1], ARGV[1])
return n
"""
"""The session's next claim number, or 0 if the session is unknown (no key is made for it).
KEYS: the claims counter, the session's meta hash; ARGV: the counter's expiry in ms."""


class RedisClaimSequence:
    """A counter per session in Redis (``<prefix>{<session id>}:claims``): one order for every
    worker. It expires ``keep`` seconds after the session's last resume, as the session's other
    keys do after their owner stops renewing them."""

    __slots__ = ("_keep_ms", "_prefix", "_script")

    def __init__(self, redis: Redis, prefix: str, keep: float) -> None:
        self._prefix = prefix
        self._keep_ms = max(1, round(keep * 1000))
        self._script = redis.register_script(_NEXT)

    def key(self, session_id: str) -> str:
        return f"{self._prefix}{{{session_id}}}:claims"

    async def next(self, session_id: str) -> int:
        from .redis_errors import redis_errors

        meta = f"{self._prefix}{{{session_id}}}:meta"
        with redis_errors("taking a resume's place in line", session_id):
            return int(await self._script([self.key(session_id), meta], [self._keep_ms]))
