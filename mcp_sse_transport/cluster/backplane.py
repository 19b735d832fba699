"""The backplane on Redis: sessions shared by every worker, POSTs handed to a session's owner,
resumes relayed from it, and sessions whose owner is gone taken over.

:class:`RedisBackplane` only wires the parts together: the worker's channel (:mod:`.bus`), the
directory and leases (:mod:`.directory`), the request ledger (:mod:`.ledger`), relayed streams
(:mod:`.relay`), POSTs (:mod:`.forwarding`), resumes (:mod:`.resume`), takeovers (:mod:`.takeover`).
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from .._sdk import Server
from ..backplane import Host, Resume
from ..claims import ClaimSequence, RedisClaimSequence
from ..config import SseConfig
from ..errors import ErrorCode
from ..ids import EventId
from ..ledger import RequestLedger
from ..session import Outcome, Session
from ..store import EventStore
from .bus import Bus
from .connect import connect
from .directory import Directory
from .forwarding import Forwarding
from .ledger import RedisRequestLedger
from .relay import Relays
from .resume import Resumes
from .takeover import Takeovers

__all__ = ["RedisBackplane"]

logger = logging.getLogger("mcp_sse_transport")


class _Parts(NamedTuple):
    """What the backplane builds once it knows the host it serves."""

    takeovers: Takeovers
    forwarding: Forwarding
    resumes: Resumes


class RedisBackplane:
    """Sessions in Redis: any worker sharing it serves any request (``server`` runs the sessions
    this worker takes over)."""

    def __init__(self, config: SseConfig, event_store: EventStore | None, server: Server[Any]) -> None:
        self._config = config
        self._server = server
        redis, store = connect(config, event_store)
        self._redis = redis
        self._store_client = store.redis if event_store is None else None
        """The store's client, when it is ours: closed on leaving."""
        self.store: EventStore = store
        self._bus = Bus(redis, store.redis, config)
        self._directory = Directory(redis, store, config, self._bus.worker_id)
        self._ledger = RedisRequestLedger(self._directory, self._bus)
        self.ledger: RequestLedger = self._ledger
        self.claims: ClaimSequence = RedisClaimSequence(redis, config.redis_prefix, config.replay_max_age)
        self._relays = Relays(self._bus, config)
        self._host: Host | None = None
        self._parts: _Parts | None = None
        self._running = AsyncExitStack()

    def bind(self, host: Host) -> None:
        self._host = host
        takeovers = Takeovers(host, self._directory, self._ledger, self._bus, self._server)
        forwarding = Forwarding(self._bus, self._directory, takeovers, host, self._config)
        resumes = Resumes(self._directory, self._relays, takeovers, host, self._config)
        self._parts = _Parts(takeovers, forwarding, resumes)

    @property
    def _bound(self) -> _Parts:
        assert self._parts is not None, "bind() first"
        return self._parts

    async def __aenter__(self) -> RedisBackplane:
        self._directory.on_lost = self._on_lost
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self._bus)  # subscribed before any lease is taken
            await stack.enter_async_context(self._directory)  # its renewals run
            self._running = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        running, self._running = self._running, AsyncExitStack()
        self._bus.stop()  # nothing more is received, and the work it spawned is cancelled
        try:
            await running.__aexit__(exc_type, exc_val, exc_tb)  # every lease given up, then the bus left
        finally:
            await self._redis.aclose()
            if self._store_client is not None:
                await self._store_client.aclose()

    def check_running(self) -> None:
        self._bus.check_running()

    async def register(self, session: Session) -> None:
        await self._directory.register(session.session_id, session.owner, session.handler.secret)
        self._bound.takeovers.fence(session)

    def serves(self, session_id: str) -> bool:
        return self._directory.serves(session_id)

    async def forget(self, session: Session) -> None:
        if session.handed_off:
            await self._directory.release(session.session_id, session.lease)
        else:
            await self._directory.forget(session.session_id, session.lease)

    async def hand_off(self, session_id: str) -> None:
        await self._directory.release(session_id)

    async def post_elsewhere(self, session_id: str, request: Request) -> Outcome:
        return await self._bound.forwarding.post_elsewhere(session_id, request)

    async def resume_elsewhere(
        self, parsed: EventId, arrived: int, scope: Scope, receive: Receive, send: Send, preface: bytes
    ) -> Resume | None:
        return await self._bound.resumes.resume_elsewhere(parsed, arrived, scope, receive, send, preface)

    def _on_lost(self, session_id: str, gone: bool) -> None:
        """This worker no longer holds the session: another worker took it over (end the stream
        here, so the client resumes where the session lives now), or Redis lost it (end it)."""
        assert self._host is not None, "bind() first"
        session = self._host.sessions.get(session_id)
        if session is None:
            return
        if gone:
            # No worker can hold a session Redis does not know (none can take it over): the
            # fence guards nothing now, and the client is told why its stream ends.
            session.handler.guard = None
            message = "Session state was lost from Redis; the session ends"
            end = session.handler.send_error
            self._bus.spawn("ending a lost session", end, ErrorCode.STORE_UNAVAILABLE, message)
        else:
            # Ended at once, with no drain: whatever it still has was stored before the lease was
            # lost (the new owner replays it) or never will be. The client's resume finds it there.
            session.handed_off = True
            session.handler.abort("another worker serves the session now")
