"""The request ledger in Redis: a request id is accepted once per session across workers, each
delivery attempt stamped with a nonce; the unanswered requests and the handshake are kept for a
worker that takes the session over."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING
from uuid import uuid4

import anyio

from ._sdk import dump, types
from .errors import StoreError
from .ids import SEEN_REQUEST_IDS
from .ledger import Admission
from .session import Session

if TYPE_CHECKING:
    from .cluster import Cluster

__all__ = ["RedisRequestLedger"]

logger = logging.getLogger("mcp_sse_transport")


@dataclass(slots=True)
class _Attempt:
    """One POST's attempt to deliver a message."""

    ledger: RedisRequestLedger
    session: Session
    message: types.JSONRPCMessage
    body: bytes
    key: str
    """The request id, as JSON ("" for a message that is not a request)."""
    nonce: str = field(default_factory=lambda: uuid4().hex[:16])
    reclaim: tuple[str, ...] = ()
    recorded: bool | None = False
    """Whether this attempt's record is in Redis; ``None``: unknown (its command failed)."""
    done: bool = False

    async def record(self) -> bool | None:
        cluster, session_id, message = self.ledger.cluster, self.session.session_id, self.message
        if isinstance(message, types.JSONRPCRequest):
            self.recorded = None  # until Redis answers
            outcome = await cluster.accept_request(session_id, message.id, self.nonce, self.reclaim)
            self.recorded = outcome == "new"
            if outcome != "new":
                return None if outcome == "full" else False
            if message.method == "initialize":
                await cluster.record_handshake(session_id, "init", self.body)
        elif isinstance(message, types.JSONRPCNotification) and message.method == "notifications/initialized":
            await cluster.record_handshake(session_id, "initialized", self.body)
        return True

    def delivered(self) -> None:
        self.done = True


class RedisRequestLedger:
    """Requests recorded in Redis by :class:`~mcp_sse_transport.cluster.Cluster`, on the worker
    serving the session (the only one that delivers them): one attempt per request id at a time."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @asynccontextmanager
    async def admit(self, session: Session, message: types.JSONRPCMessage, body: bytes) -> AsyncIterator[Admission]:
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
                self.cluster.spawn("undoing an undelivered request's record", self._undo, attempt)
        attempts.in_flight.pop(attempt.key).set()

    async def _undo(self, attempt: _Attempt) -> None:
        """Remove an undelivered attempt's record from Redis (best effort: while it stays, the
        next attempt takes it over), so a worker taking the session over neither takes the id
        for delivered nor answers it ``REQUEST_INTERRUPTED``."""
        session = attempt.session
        request_id: types.RequestId = json.loads(attempt.key)
        try:
            with anyio.fail_after(self.cluster.config.forward_timeout):
                undone = await self.cluster.unaccept_request(session.session_id, request_id, attempt.nonce)
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
        await self.cluster.record_handshake(session.session_id, "init", dump(initialize).encode())
        await self.cluster.record_handshake(session.session_id, "initialized", dump(initialized).encode())

    async def answered(self, session: Session, request_id: types.RequestId) -> None:
        await session.handler.flush()  # stored before it is struck off: this worker may die
        await self._strike_off(session, request_id)

    def on_unanswered(self, session: Session, message: types.JSONRPCMessage) -> Callable[[], Awaitable[None]] | None:
        return partial(self._strike_off, session, message.id) if isinstance(message, types.JSONRPCRequest) else None

    async def after_delivery(self, session: Session, message: types.JSONRPCMessage) -> None:
        """A ``notifications/cancelled`` strikes its request off the unanswered list (before its
        POST is answered): the server will not answer it."""
        if isinstance(message, types.JSONRPCNotification) and message.method == "notifications/cancelled":
            request_id = (message.params or {}).get("requestId")
            if isinstance(request_id, str | int) and not isinstance(request_id, bool):
                await self._strike_off(session, request_id)

    async def _strike_off(self, session: Session, request_id: types.RequestId) -> None:
        try:
            await self.cluster.remove_pending(session.session_id, request_id)
        except StoreError as exc:  # it stays until the session ends (or is answered at a takeover)
            logger.warning("session %s: %s", session.handler.tag, exc)
