"""The request ledger: which request ids a session accepted, and which still wait for an answer.

One protocol, two ledgers: in memory (one worker: the ids seen, nothing else to keep) and in
Redis (:mod:`mcp_sse_transport.cluster.ledger`: the ids, the unanswered requests and the handshake,
for a worker that takes the session over).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from ._sdk import Message, types
from .session import SeenIds, Session, Stream

__all__ = ["Admission", "MemoryRequestLedger", "RequestLedger"]


class Admission(Protocol):
    """One POST's attempt to hand a message to its session's server."""

    async def record(self) -> bool | None:
        """Note the message in the ledger: False for a request id the session accepted before
        (MCP forbids reuse: a POST sent again), ``None`` when it has too many unanswered, True
        otherwise. Raises :class:`~mcp_sse_transport.errors.StoreError`: not delivered."""
        ...

    def delivered(self) -> None:
        """The server has the message."""
        ...


class RequestLedger(Protocol):
    def admit(self, session: Session, message: Message, body: bytes) -> AbstractAsyncContextManager[Admission]:
        """An attempt to deliver ``message`` (``body`` as POSTed): recorded by the caller, then
        either delivered or not when the context ends (an undelivered record is undone)."""
        ...

    async def record_restored(
        self, session: Session, initialize: types.JSONRPCRequest, initialized: types.JSONRPCNotification
    ) -> None:
        """Keep a restored session's replayed handshake, as a POSTed one is kept. Raises StoreError."""
        ...

    async def answered(self, session: Session, stream: Stream, request_id: types.RequestId) -> None:
        """The server sent its answer to ``request_id`` into ``stream``, one of the session's."""
        ...

    def on_unanswered(self, session: Session, message: Message) -> Callable[[], Awaitable[None]] | None:
        """What runs if a delivered request settles without an answer (it was cancelled)."""
        ...

    async def after_delivery(self, session: Session, message: Message) -> None:
        """The server has ``message`` (a ``notifications/cancelled``: its request gets no answer)."""
        ...


class _Recorded:
    __slots__ = ("_message", "_session", "done", "recorded")

    def __init__(self, session: Session, message: Message) -> None:
        self._session = session
        self._message = message
        self.recorded = False
        self.done = False

    async def record(self) -> bool | None:
        if not isinstance(self._message, types.JSONRPCRequest):
            return True
        if self._session.seen is None:
            self._session.seen = SeenIds()
        self.recorded = self._session.seen.add(self._message.id)
        return self.recorded

    def delivered(self) -> None:
        self.done = True

    def undo(self) -> None:
        """Not delivered after all (the session ended, or the POST was cancelled): the id is
        free again, so the client's next attempt is delivered, not taken for a repeat."""
        if self.recorded and not self.done and self._session.seen is not None:
            assert isinstance(self._message, types.JSONRPCRequest)
            self._session.seen.discard(self._message.id)


class MemoryRequestLedger:
    """One worker's ledger: the last ids each session accepted, kept with the session."""

    @asynccontextmanager
    async def admit(self, session: Session, message: Message, body: bytes) -> AsyncIterator[Admission]:
        admission = _Recorded(session, message)
        try:
            yield admission
        finally:
            admission.undo()

    async def record_restored(
        self, session: Session, initialize: types.JSONRPCRequest, initialized: types.JSONRPCNotification
    ) -> None:
        pass  # nobody else replays it

    async def answered(self, session: Session, stream: Stream, request_id: types.RequestId) -> None:
        pass  # unanswered requests matter to a takeover only

    def on_unanswered(self, session: Session, message: Message) -> Callable[[], Awaitable[None]] | None:
        return None

    async def after_delivery(self, session: Session, message: Message) -> None:
        pass
