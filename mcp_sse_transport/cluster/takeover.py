"""Taking over, on this worker, a session whose owner's lease ran out: a fresh SDK server fed
the stored handshake, and ``REQUEST_INTERRUPTED`` for every request the old owner never answered."""

from __future__ import annotations

import logging
from contextlib import suppress
from functools import partial
from typing import Any

import anyio

from .._sdk import Server, dump, jsonrpc_error, parse, session_message, types
from ..backplane import Host
from ..errors import ErrorCode, StoreError
from ..session import Session, SessionsFull
from .bus import Bus
from .directory import Directory
from .ledger import RedisRequestLedger

__all__ = ["Takeovers"]

logger = logging.getLogger("mcp_sse_transport")

_INTERRUPTED_PAGE = 500
"""Interrupted requests' errors stored per round trip."""


class Takeovers:
    """This worker's takeovers: one at a time per session, counted against ``max_sessions``;
    a session taken over runs in ``bus``'s task group, on ``server``."""

    def __init__(
        self, host: Host, directory: Directory, ledger: RedisRequestLedger, bus: Bus, server: Server[Any]
    ) -> None:
        self._host = host
        self._directory = directory
        self._ledger = ledger
        self._bus = bus
        self._server = server
        self._adopting: dict[str, anyio.Event] = {}

    async def local(self, session_id: str) -> Session | None:
        """This worker's session, once no takeover of it is in progress here (one that failed
        may be followed by another request's: wait for that one too)."""
        while (adopting := self._adopting.get(session_id)) is not None:
            await adopting.wait()
        return self._host.sessions.get(session_id)

    async def adopt(self, session_id: str) -> Session | None:
        """Take over a session whose owner's lease ran out. ``None`` if another worker holds
        the lease. Raises :class:`SessionsFull` when this worker has ``max_sessions`` open
        already: a takeover counts as much as a new session."""
        directory, host = self._directory, self._host
        if (session := await self.local(session_id)) is not None and host.serving(session_id) is session:
            return session
        if not host.reserve_slot():  # no await since local(): the check and the count are one
            raise SessionsFull
        done = self._adopting[session_id] = anyio.Event()  # no await since local(): nobody else is
        try:
            if not await directory.acquire(session_id):
                return None
            # Shielded: a session half taken over would forget, on expiry, what Redis holds of it.
            with anyio.CancelScope(shield=True):
                try:
                    session = await self._take_over(session_id)
                except BaseException:
                    with suppress(StoreError):
                        await directory.abandon(session_id)  # nothing written: as if never taken over
                    raise
            return session
        finally:
            host.release_slot()
            if self._adopting.get(session_id) is done:
                del self._adopting[session_id]
            done.set()

    async def _take_over(self, session_id: str) -> Session | None:
        directory = self._directory
        entry = await directory.lookup(session_id)
        if entry is None:
            await directory.release(session_id)
            return None
        unanswered = await self._interrupt_unanswered(session_id)
        last_token = await directory.store.last_token(session_id)
        session, read_stream = self._host.create(
            session_id, entry.fingerprint, secret=entry.secret, last_token=last_token
        )
        self.fence(session)
        logger.info("session %s: taken over from a worker that stopped", session.handler.tag)
        await self._bus.task_group.start(self._host.run, session, read_stream, self._server)
        for raw in entry.handshake:
            message = parse(raw)
            if isinstance(message, types.JSONRPCRequest):
                session.swallow = message.id
            await session.inbound.send(session_message(message))
        if unanswered:  # stored before they are struck off: this worker may die too
            await self._ledger.remove_pending(session_id, *unanswered)
        self._host.sessions.add(session_id, session)
        return session

    async def _interrupt_unanswered(self, session_id: str) -> list[types.RequestId]:
        """Store a ``REQUEST_INTERRUPTED`` error for every request the old owner accepted and
        never answered, straight into the replay log, before the session's handler exists: no
        producer's grant, so no buffer bound, only the pending bound (``replay_max_events``);
        the client's resume replays them. Returns their ids, to strike off once stored."""
        unanswered = await self._ledger.pending(session_id)
        events = [
            (
                "message",  # as the handler stores a message
                dump(
                    jsonrpc_error(
                        request_id,
                        "The server handling this request stopped before answering it",
                        ErrorCode.REQUEST_INTERRUPTED,
                    )
                ).encode(),
            )
            for request_id in unanswered
        ]
        for start in range(0, len(events), _INTERRUPTED_PAGE):  # one round trip each, of a bounded size
            await self._directory.store.append_many(session_id, events[start : start + _INTERRUPTED_PAGE])
        return unanswered

    def fence(self, session: Session) -> None:
        """Bind the session to the lease this worker just took of it: its writes to clients wait
        while the lease is not surely valid, and stop once it is lost."""
        lease = session.lease = self._directory.lease(session.session_id)
        assert lease is not None
        session.handler.guard = partial(lease.hold, bounded=False)

    async def clear_own_lease(self, session_id: str) -> None:
        """The directory names this worker as the owner of a session it does not serve: a lease
        left behind (its release failed, say). Give it up, so the session is taken over at once;
        if this worker still renews it (the session is ending here), wait the lease out rather
        than ask Redis again and again."""
        if self._directory.renews(session_id):
            await self.await_lease(session_id)
        else:
            await self._directory.drop_stale_lease(session_id)

    async def await_lease(self, session_id: str) -> None:
        """Wait until the lease of an owner that nobody answers for runs out."""
        remaining = await self._directory.lease_remaining(session_id)
        if remaining > 0:
            await anyio.sleep(remaining)  # a lease is a deadline: nothing to wait on but the clock
