"""The backplane: what a worker's session host needs of the other workers, behind one protocol.

:class:`LocalBackplane` is one worker alone: it serves every session it holds, and no other.
:class:`~mcp_sse_transport.cluster.RedisBackplane` shares sessions through Redis: any
worker serves any request, and a dead worker's sessions are taken over. Front ends and the
session host call the backplane and never ask which one it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol

import anyio.abc
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ._sdk import ContextReceiveStream, ReadStream, Server, SessionMessage
from .claims import ClaimSequence, LocalClaimSequence
from .config import SseConfig
from .ids import EventId, session_tag
from .ledger import MemoryRequestLedger, RequestLedger
from .registry import SessionRegistry
from .session import NOT_FOUND, Outcome, Session
from .store import EventStore

__all__ = ["Backplane", "Host", "LocalBackplane", "Resume"]

logger = logging.getLogger("mcp_sse_transport")

Resume = Callable[[], Coroutine[Any, Any, None]]
"""What serves a resumed stream, once the GET's response may start."""


class Host(Protocol):
    """What a backplane needs of the worker's session host."""

    @property
    def config(self) -> SseConfig: ...

    @property
    def sessions(self) -> SessionRegistry[Session]: ...

    def serving(self, session_id: str) -> Session | None: ...

    def reserve_slot(self) -> bool: ...

    def release_slot(self) -> None: ...

    def create(
        self, session_id: str, owner: str, *, secret: str | None = None, last_token: str | None = None
    ) -> tuple[Session, ContextReceiveStream[SessionMessage | Exception]]: ...

    async def deliver(self, session: Session, body: bytes, request: Request) -> Outcome: ...

    async def run(
        self,
        session: Session,
        read_stream: ReadStream[SessionMessage | Exception],
        server: Server[Any],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None: ...


class Backplane(Protocol):
    """Where sessions live beyond this worker, and how requests for them reach them."""

    store: EventStore
    ledger: RequestLedger
    claims: ClaimSequence
    """Orders the resumes of a session, on every worker alike."""

    def bind(self, host: Host) -> None:
        """The session host whose sessions this backplane shares."""

    async def __aenter__(self) -> Backplane:
        """Join the other workers. Raises StoreError when they cannot be reached."""

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None: ...

    def check_running(self) -> None:
        """Raise RuntimeError if a request arrives while the backplane is not entered."""

    async def register(self, session: Session) -> None:
        """A new session opened here. Raises StoreError: it could not be shared."""

    def serves(self, session_id: str) -> bool:
        """Whether this worker still serves a session it holds (not taken over elsewhere)."""

    async def forget(self, session: Session) -> None:
        """The session ended here: drop its state, unless another worker carries it on
        (``session.handed_off``). Raises StoreError."""

    async def hand_off(self, session_id: str) -> None:
        """This worker stops serving the session (it shuts down): another worker may take it
        over at once. Raises StoreError."""

    async def resume_elsewhere(
        self, parsed: EventId, arrived: int, scope: Scope, receive: Receive, send: Send, preface: bytes
    ) -> Resume | None:
        """What serves the resume of a session this worker does not hold, if it may be resumed
        by this credential; ``preface`` opens the stream. Raises StoreError."""

    async def post_elsewhere(self, session_id: str, request: Request) -> Outcome:
        """Deliver a POST for a session this worker does not serve."""


class LocalBackplane:
    """One worker alone: its store, the ids its sessions accepted, resumes in arrival order."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.ledger: RequestLedger = MemoryRequestLedger()
        self.claims: ClaimSequence = LocalClaimSequence()

    def bind(self, host: Host) -> None:
        pass

    async def __aenter__(self) -> LocalBackplane:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        pass

    def check_running(self) -> None:
        pass

    async def register(self, session: Session) -> None:
        pass

    def serves(self, session_id: str) -> bool:
        return True

    async def forget(self, session: Session) -> None:
        await self.store.drop(session.session_id)

    async def hand_off(self, session_id: str) -> None:
        pass

    async def resume_elsewhere(
        self, parsed: EventId, arrived: int, scope: Scope, receive: Receive, send: Send, preface: bytes
    ) -> Resume | None:
        return None

    async def post_elsewhere(self, session_id: str, request: Request) -> Outcome:
        logger.info("POST for unknown session %s", session_tag(session_id))
        return NOT_FOUND
