"""The request ledger in Redis: a request id is accepted once per session across workers, each
delivery attempt stamped with a nonce; the unanswered requests and the handshake are kept for a
worker that takes the session over."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, cast
from uuid import uuid4

import anyio

from .._sdk import Message, dump, types
from ..errors import FencedError, StoreError
from ..fencing import REMOVE_PENDING
from ..ids import SEEN_REQUEST_IDS, session_tag
from ..ledger import Admission
from ..redis_errors import redis_errors
from ..session import Session, Stream
from .bus import Bus
from .directory import Directory

__all__ = ["Accepted", "RedisRequestLedger"]

logger = logging.getLogger("mcp_sse_transport")

_ACCEPT = """
local current = redis.call('hget', KEYS[1], ARGV[1])
if current == ARGV[2] then return 1 end
if current then
  local reclaimable = false
  for i = 6, #ARGV do if current == ARGV[i] then reclaimable = true end end
  if not reclaimable then return 0 end
elseif redis.call('scard', KEYS[2]) >= tonumber(ARGV[5]) then
  return -1
end
redis.call('hset', KEYS[1], ARGV[1], ARGV[2])
redis.call('sadd', KEYS[2], ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[4])
redis.call('pexpire', KEYS[2], ARGV[4])
if not current and redis.call('hlen', KEYS[1]) > tonumber(ARGV[3]) then
  for _, field in ipairs(redis.call('hrandfield', KEYS[1], 2)) do
    if field ~= ARGV[1] then redis.call('hdel', KEYS[1], field) break end
  end
end
return 1
"""
"""Note a request id as seen and unanswered, stamped with the accepting attempt's nonce: 1 if
accepted now (or already by this very attempt: a retry after a lost reply is harmless), 0 if
seen before, -1 if the session has too many requests unanswered. An id stamped with one of the
``reclaim`` nonces (attempts of this worker that recorded the id but never delivered it) is
taken over by this attempt. KEYS: seen (a hash: id -> nonce), pending; ARGV: the id, the
nonce, how many ids to remember, the keys' expiry in ms, the pending bound, reclaimable nonces."""

_UNACCEPT = """
if redis.call('hget', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('hdel', KEYS[1], ARGV[1])
redis.call('srem', KEYS[2], ARGV[1])
return 1
"""
"""Undo an attempt's record of a request it did not deliver, unless another attempt took the id
over meanwhile: idempotent, and harmless however late it runs. KEYS: seen, pending; ARGV: the
id, the nonce."""

Accepted = Literal["new", "seen", "full"]
"""What :meth:`RedisRequestLedger.accept_request` found."""


@dataclass(slots=True)
class _Attempt:
    """One POST's attempt to deliver a message."""

    ledger: RedisRequestLedger
    session: Session
    message: Message
    body: bytes
    key: str
    """The request id, as JSON ("" for a message that is not a request)."""
    nonce: str = field(default_factory=lambda: uuid4().hex[:16])
    reclaim: tuple[str, ...] = ()
    recorded: bool | None = False
    """Whether this attempt's record is in Redis; ``None``: unknown (its command failed)."""
    done: bool = False

    async def record(self) -> bool | None:
        ledger, session_id, message = self.ledger, self.session.session_id, self.message
        if isinstance(message, types.JSONRPCRequest):
            self.recorded = None  # until Redis answers
            outcome = await ledger.accept_request(session_id, message.id, self.nonce, self.reclaim)
            self.recorded = outcome == "new"
            if outcome != "new":
                return None if outcome == "full" else False
            if message.method == "initialize":
                await ledger.record_handshake(session_id, "init", self.body)
        elif isinstance(message, types.JSONRPCNotification) and message.method == "notifications/initialized":
            await ledger.record_handshake(session_id, "initialized", self.body)
        return True

    def delivered(self) -> None:
        self.done = True


class RedisRequestLedger:
    """Requests recorded in Redis, on the worker serving the session (the only one that
    delivers them): one attempt per request id at a time. Keyed and fenced by ``directory``;
    undoing an undelivered attempt's record runs on ``bus``."""

    def __init__(self, directory: Directory, bus: Bus) -> None:
        self.directory = directory
        self.config = directory.config
        self._bus = bus
        redis = directory.redis
        self._redis = redis
        self._accept = redis.register_script(_ACCEPT)
        self._unaccept = redis.register_script(_UNACCEPT)
        self._remove_pending = redis.register_script(REMOVE_PENDING)

    @asynccontextmanager
    async def admit(self, session: Session, message: Message, body: bytes) -> AsyncIterator[Admission]:
        if not isinstance(message, types.JSONRPCRequest):
            yield _Attempt(self, session, message, body, "")
            return
        key = json.dumps(message.id)
        attempts = session.attempts
        while (earlier := attempts.in_flight.get(key)) is not None:
            await earlier.wait()  # a POST sent again while the first is delivered waits for its outcome
        attempts.in_flight[key] = anyio.Event()  # no await since the check: nobody else is
        attempt = _Attempt(self, session, message, body, key, reclaim=tuple(attempts.undelivered.get(key, ())))
        try:
            yield attempt
        finally:
            self._end(attempt)

    def _end(self, attempt: _Attempt) -> None:
        """An attempt is over: one that may have recorded its id without delivering it leaves
        its nonce for the next attempt to take the record over, and has the record undone."""
        attempts = attempt.session.attempts
        if attempt.done:
            attempts.undelivered.pop(attempt.key, None)
        elif attempt.recorded is not False:
            attempts.undelivered.setdefault(attempt.key, set()).add(attempt.nonce)
            while len(attempts.undelivered) > SEEN_REQUEST_IDS:  # bounded as the ids seen are
                del attempts.undelivered[next(iter(attempts.undelivered))]
            with suppress(RuntimeError):  # the worker is leaving: the next attempt takes the record over
                self._bus.spawn("undoing an undelivered request's record", self._undo, attempt)
        attempts.in_flight.pop(attempt.key).set()

    async def _undo(self, attempt: _Attempt) -> None:
        """Remove an undelivered attempt's record from Redis (best effort: while it stays, the
        next attempt takes it over), so a worker taking the session over neither takes the id
        for delivered nor answers it ``REQUEST_INTERRUPTED``."""
        session = attempt.session
        request_id: types.RequestId = json.loads(attempt.key)
        try:
            with anyio.fail_after(self.config.forward_timeout):
                undone = await self.unaccept_request(session.session_id, request_id, attempt.nonce)
        except (StoreError, TimeoutError) as exc:
            logger.info("session %s: an undelivered request stays recorded (%s)", session.handler.tag, exc)
            return
        nonces = session.attempts.undelivered.get(attempt.key)
        if undone and nonces is not None:
            nonces.discard(attempt.nonce)
            if not nonces:
                del session.attempts.undelivered[attempt.key]

    async def record_restored(
        self, session: Session, initialize: types.JSONRPCRequest, initialized: types.JSONRPCNotification
    ) -> None:
        await self.record_handshake(session.session_id, "init", dump(initialize).encode())
        await self.record_handshake(session.session_id, "initialized", dump(initialized).encode())

    async def answered(self, session: Session, stream: Stream, request_id: types.RequestId) -> None:
        await stream.flush()  # stored before it is struck off: this worker may die
        await self._strike_off(session, request_id)

    def on_unanswered(self, session: Session, message: Message) -> Callable[[], Awaitable[None]] | None:
        return partial(self._strike_off, session, message.id) if isinstance(message, types.JSONRPCRequest) else None

    async def after_delivery(self, session: Session, message: Message) -> None:
        """A ``notifications/cancelled`` strikes its request off the unanswered list (before its
        POST is answered): the server will not answer it."""
        if isinstance(message, types.JSONRPCNotification) and message.method == "notifications/cancelled":
            request_id = (message.params or {}).get("requestId")
            if isinstance(request_id, str | int) and not isinstance(request_id, bool):
                await self._strike_off(session, request_id)

    async def _strike_off(self, session: Session, request_id: types.RequestId) -> None:
        try:
            await self.remove_pending(session.session_id, request_id)
        except StoreError as exc:  # it stays until the session ends (or is answered at a takeover)
            logger.warning("session %s: %s", session.handler.tag, exc)

    # -- the records in Redis ------------------------------------------------------------------

    async def record_handshake(self, session_id: str, field: str, body: bytes) -> None:
        """Keep the handshake's ``init`` request or ``initialized`` notification, for a takeover."""
        with redis_errors("recording the handshake", session_id):
            await self._redis.hset(self.directory.key(session_id, "meta"), field, body)

    async def accept_request(
        self, session_id: str, request_id: str | int, nonce: str, reclaim: Collection[str] = ()
    ) -> Accepted:
        """Note a request as accepted and unanswered, by the attempt ``nonce``: ``"new"``;
        ``"seen"`` if the session had it already (a POST the client sent again, not knowing
        whether the first one arrived), unless it was recorded by one of the ``reclaim``
        attempts (recorded, never delivered); ``"full"`` past :attr:`max_pending` unanswered
        requests (nothing recorded). Safe to send again: the same nonce is accepted once."""
        key = self.directory.key
        keys = [key(session_id, "seen"), key(session_id, "pending")]
        args: list[str | int] = [json.dumps(request_id), nonce, SEEN_REQUEST_IDS]
        args += [round(self.config.replay_max_age * 1000), self.max_pending, *reclaim]
        with redis_errors("recording a request", session_id):
            outcome = int(await self._accept(keys, args))
        return "new" if outcome == 1 else "seen" if outcome == 0 else "full"

    @property
    def max_pending(self) -> int:
        """Requests a session may have accepted and not answered (``replay_max_events``): a
        worker taking it over answers each with ``REQUEST_INTERRUPTED``, and the replay log must
        keep those answers."""
        return self.config.replay_max_events

    async def unaccept_request(self, session_id: str, request_id: str | int, nonce: str) -> bool:
        """Undo the record of the attempt ``nonce``, which did not deliver the request (unless
        another attempt took the id over since); False if nothing was undone."""
        keys = [self.directory.key(session_id, "seen"), self.directory.key(session_id, "pending")]
        with redis_errors("undoing a request's record", session_id):
            return bool(await self._unaccept(keys, [json.dumps(request_id), nonce]))

    async def remove_pending(self, session_id: str, *request_ids: str | int) -> None:
        """The requests were answered (their answers are stored). Fenced: raises
        :class:`FencedError`, striking nothing off, once another worker holds the session."""
        lease, fence_keys, fence_args = self.directory.fence(session_id)
        lease.wrote = True
        with redis_errors("recording a response", session_id):
            removed = await self._remove_pending(
                [self.directory.key(session_id, "pending"), *fence_keys],
                [*fence_args, *(json.dumps(rid) for rid in request_ids)],
            )
        if int(removed) < 0:
            lease.revoke()  # lost: the directory is told (if it is still the current lease)
            raise FencedError(f"session {session_tag(session_id)}: answers not recorded, another worker holds it now")

    async def pending(self, session_id: str) -> list[str | int]:
        """The requests accepted and not answered."""
        with redis_errors("reading unanswered requests", session_id):
            members = await self._redis.smembers(self.directory.key(session_id, "pending"))
        return sorted((cast(str | int, json.loads(member)) for member in members), key=str)
