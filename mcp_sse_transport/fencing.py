"""Fenced ownership: each lease carries a generation that Redis issues, and every write an owner
makes to a session's shared state is conditional on it, in Redis, atomically.

Taking a lease (registering a session, or taking one over) increments the session's generation,
the ``g`` field of its ``meta`` hash, in the same script that sets the ``owner`` key (which
keeps holding the worker id). An owner's appends, answer bookkeeping, renewals, release and
forget run in scripts that first check that the generation is still the one its lease got and
that no other worker holds the ``owner`` key: a worker whose lease passed to another, even if it
does not know yet (its event loop stalled, or it was cut off from Redis), changes nothing.

Locally, a :class:`Lease` knows until when it is surely valid: from the moment before its last
granted renewal was sent, plus ``owner_lease`` (Redis counts the lease from later than that).
Writes to clients and appends wait while that moment, less a margin, has passed and no renewal
was granted since; a lease that another worker holds now is revoked, and its session handed off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio

from .errors import FencedError
from .ids import session_tag

__all__ = ["ABANDON", "ACQUIRE", "FENCE_CHECK", "FORGET", "REGISTER", "RELEASE", "REMOVE_PENDING", "RENEW", "Lease"]

FENCE_CHECK = """
local function fenced(owner_key, meta_key, me, generation)
  if redis.call('hget', meta_key, 'g') ~= generation then return true end
  local owner = redis.call('get', owner_key)
  return owner and owner ~= me
end
"""
"""A Lua function for scripts that act for a lease: true when ``generation`` is no longer the
session's (another worker took a lease since, or the session is gone), or another worker holds
the ``owner`` key. Its lease having run out with nobody taking it over fences nothing: no other
worker wrote since."""

REGISTER = """
local generation = redis.call('hincrby', KEYS[2], 'g', 1)
redis.call('hset', KEYS[2], 'fp', ARGV[4], 'rs', ARGV[5])
redis.call('pexpire', KEYS[2], ARGV[3])
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
return generation
"""
"""Enter a session with its first lease. KEYS: owner, meta; ARGV: worker id, lease ms, keys'
expiry ms, fingerprint, resume secret. Returns the lease's generation."""

ACQUIRE = """
if redis.call('exists', KEYS[2]) == 0 then return -1 end
if not redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then return 0 end
return redis.call('hincrby', KEYS[2], 'g', 1)
"""
"""Take the lease of a session whose owner's ran out. KEYS: owner, meta; ARGV: worker id, lease
ms. Returns the new generation; 0 if another worker holds the lease, -1 if the session is gone."""

RENEW = (
    FENCE_CHECK
    + """
if redis.call('exists', KEYS[2]) == 0 then return -1 end
if fenced(KEYS[1], KEYS[2], ARGV[1], ARGV[4]) then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
for i = 2, #KEYS do redis.call('pexpire', KEYS[i], ARGV[3]) end
return 1
"""
)
"""Renew a lease (or take it back if it ran out while no one took it: after a Redis outage), and
keep the session's other keys from expiring. KEYS: owner, meta, then the other keys; ARGV:
worker id, lease ms, keys' expiry ms, generation. 0: fenced; -1: the session is gone (Redis lost
its data)."""

RELEASE = (
    FENCE_CHECK
    + """
if fenced(KEYS[1], KEYS[2], ARGV[1], ARGV[2]) then return 0 end
return redis.call('del', KEYS[1])
"""
)
"""Give a lease up. KEYS: owner, meta; ARGV: worker id, generation. 0: fenced (or not held)."""

ABANDON = """
if redis.call('get', KEYS[1]) ~= ARGV[1] or redis.call('hget', KEYS[2], 'g') ~= ARGV[2] then return 0 end
redis.call('del', KEYS[1])
redis.call('hset', KEYS[2], 'g', tonumber(ARGV[2]) - 1)
return 1
"""
"""Give up a lease taken over and never written with (the takeover failed before its first
write): the generation goes back to the previous owner's, whose renewal may take the lease
back (after a Redis outage, say), as if the takeover had never been. KEYS: owner, meta; ARGV:
worker id, generation. 0: not held (nothing changed)."""

FORGET = """
local generation = redis.call('hget', KEYS[2], 'g')
if generation and generation ~= ARGV[2] then return 0 end
local owner = redis.call('get', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('del', unpack(KEYS))
return 1
"""
"""Delete an ended session: every key of it, unless another worker took a lease since. KEYS:
owner, meta, then the others; ARGV: worker id, generation. 0: fenced, nothing deleted."""

REMOVE_PENDING = (
    FENCE_CHECK
    + """
if fenced(KEYS[2], KEYS[3], ARGV[1], ARGV[2]) then return -1 end
return redis.call('srem', KEYS[1], unpack(ARGV, 3))
"""
)
"""Strike answered requests off. KEYS: pending, owner, meta; ARGV: worker id, generation, the
ids. -1: fenced, nothing struck off."""


class Lease:
    """This worker's hold of one session: the generation Redis issued it, and until when (on
    this host's monotonic clock) it is surely valid."""

    __slots__ = (
        "_on_revoked",
        "_renewed",
        "generation",
        "margin",
        "meta_key",
        "owner_key",
        "revoked",
        "session_id",
        "term",
        "timeout",
        "valid_until",
        "worker_id",
        "wrote",
    )

    def __init__(
        self,
        session_id: str,
        generation: int,
        *,
        worker_id: str,
        owner_key: str,
        meta_key: str,
        term: float,
        sent: float,
        timeout: float,
        on_revoked: Callable[[Lease], None] | None = None,
    ) -> None:
        """``term`` is ``owner_lease``; ``sent``, the monotonic time before the command that took
        the lease was sent; ``timeout``, how long an append waits for a renewal before the
        lease is given up for lost."""
        self.session_id = session_id
        self.generation = generation
        self.worker_id = worker_id
        self.owner_key = owner_key
        self.meta_key = meta_key
        self.term = term
        self.margin = term / 10
        """Writes stop this long before the lease could run out: what a write takes to go out."""
        self.timeout = timeout
        self.valid_until = sent + term
        self.revoked = False
        self.wrote = False
        """A write was sent under this lease (an append, answers struck off): it cannot be abandoned."""
        self._renewed: anyio.Event | None = None
        self._on_revoked = on_revoked

    def __repr__(self) -> str:
        revoked = " revoked" if self.revoked else ""
        return f"<Lease {session_tag(self.session_id)} generation {self.generation}{revoked}>"

    def valid(self) -> bool:
        """Whether this worker may still write for the session, now."""
        return not self.revoked and time.monotonic() < self.valid_until - self.margin

    def renewed(self, sent: float) -> None:
        """Redis granted a renewal sent at monotonic time ``sent``."""
        if not self.revoked:
            self.valid_until = max(self.valid_until, sent + self.term)
            self._wake()

    def revoke(self) -> None:
        """The lease is lost (another worker holds it), or given up: nothing more is written for
        it. The first revocation tells the cluster."""
        if self.revoked:
            return
        self.revoked = True
        self._wake()
        if self._on_revoked is not None:
            self._on_revoked(self)

    def _wake(self) -> None:
        if self._renewed is not None:
            self._renewed.set()
            self._renewed = None

    async def hold(self, *, bounded: bool = True) -> None:
        """Return once the lease is valid: at once, unless its validity ran out locally (the
        event loop stalled, or renewals fail); then wait for a renewal. Raises
        :class:`FencedError` once it is revoked, or (``bounded``) if no renewal comes within
        ``timeout``, which revokes it; unbounded, it waits for as long as the caller lets it."""
        while not self.valid():
            if self.revoked:
                raise FencedError(f"session {session_tag(self.session_id)}: this worker's lease is lost")
            if self._renewed is None:
                self._renewed = anyio.Event()
            renewed = self._renewed
            if not bounded:
                await renewed.wait()
                continue
            with anyio.move_on_after(self.timeout):
                await renewed.wait()
            if not renewed.is_set():
                self.revoke()
                tag = session_tag(self.session_id)
                raise FencedError(f"session {tag}: the lease lapsed and was not renewed in time")

    def fence(self) -> tuple[list[str], list[str | int]]:
        """The keys and arguments a fenced script takes after its own: owner key, meta key;
        worker id, generation."""
        return [self.owner_key, self.meta_key], [self.worker_id, self.generation]
