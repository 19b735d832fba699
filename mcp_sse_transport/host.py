"""The session host: one worker's sessions, each an SDK server run, its owner, its stream and its
request ledger; POSTed messages handed to their servers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from functools import partial
from typing import Any

import anyio
import anyio.abc
from starlette.requests import Request

from ._sdk import (
    ContextReceiveStream,
    Message,
    ReadStream,
    Server,
    ServerMessageMetadata,
    SessionMessage,
    ValidationError,
    metadata,
    parse,
    restored_handshake,
    server_streams,
    session_message,
    types,
)
from .backplane import Backplane
from .config import SseConfig
from .errors import StoreError
from .handler import SessionHandler
from .outbound import (
    CLOSED,
    ServerWriteStream,
    id_too_long,
    id_too_long_answer,
    report_id_too_long,
    report_parse_error,
)
from .registry import RegistryStatistics, SessionRegistry
from .session import ACCEPTED, NOT_HERE, REPEATED, STORE_UNAVAILABLE, Delivery, Outcome, Restore, Session, SessionsFull

__all__ = ["SessionHost"]

logger = logging.getLogger("mcp_sse_transport")


def _metadata(
    request: Request, on_unanswered: Callable[[], Awaitable[None]] | None, delivery: Delivery | None
) -> ServerMessageMetadata:
    """The message's metadata: the ledger's hook and the front end's, both run when a request
    settles unanswered."""
    if delivery is None:
        return metadata(request, on_unanswered)
    hooks = [hook for hook in (on_unanswered, delivery.on_unanswered) if hook is not None]

    async def unanswered() -> None:
        for hook in hooks:
            await hook()

    return metadata(
        request,
        unanswered if hooks else None,
        close_stream=delivery.close_stream,
        close_standalone=delivery.close_standalone,
        can_send_request=delivery.can_send_request,
    )


class SessionHost:
    """A worker's sessions, shared with other workers through ``backplane``."""

    def __init__(self, config: SseConfig, backplane: Backplane) -> None:
        self._config = config
        self._backplane = backplane
        self._sessions: SessionRegistry[Session] = SessionRegistry()
        self._reserved = 0
        """Sessions being opened or taken over, not yet in the registry: ``max_sessions`` counts them."""
        backplane.bind(self)

    @property
    def config(self) -> SseConfig:
        return self._config

    @property
    def sessions(self) -> SessionRegistry[Session]:
        return self._sessions

    def statistics(self) -> RegistryStatistics:
        return self._sessions.statistics()

    def serving(self, session_id: str) -> Session | None:
        """This worker's session, unless it lives on another worker now (its stream may still
        be ending here: requests for it go there, or take it over anew)."""
        session = self._sessions.get(session_id)
        return session if session is not None and self._backplane.serves(session_id) else None

    # -- opening and ending sessions ---------------------------------------------------------------

    def reserve_slot(self) -> bool:
        """Count a session about to be opened or taken over against ``max_sessions``, with no
        await between the check and the count; False (logged) when the worker is full. The
        caller gives the slot back (:meth:`release_slot`) once the session is in the registry,
        or failed to get there."""
        limit = self._config.max_sessions
        if limit is not None and len(self._sessions) + self._reserved >= limit:
            logger.warning("refused a session: %d open, the limit", limit)
            return False
        self._reserved += 1
        return True

    def release_slot(self) -> None:
        self._reserved -= 1

    def create(
        self, session_id: str, owner: str, *, secret: str | None = None, last_token: str | None = None
    ) -> tuple[Session, ContextReceiveStream[SessionMessage | Exception]]:
        """A session not yet registered, and its server's read stream."""
        inbound, read_stream = server_streams()
        handler = SessionHandler(session_id, self._config, self._backplane.store, last_token=last_token, secret=secret)
        return Session(handler, inbound, owner), read_stream

    async def open(
        self, session_id: str, owner: str, restore: Restore | None
    ) -> tuple[Session, ContextReceiveStream[SessionMessage | Exception]]:
        """A new session, registered here and with the backplane. Raises :class:`SessionsFull`
        past ``max_sessions``, StoreError when the backplane cannot share it."""
        if not self.reserve_slot():  # before any await: concurrent opens cannot overshoot the cap
            raise SessionsFull
        try:
            session, read_stream = self.create(session_id, owner)
            session.restore = restore
            await self._backplane.register(session)
            self._sessions.add(session_id, session)
        finally:
            self.release_slot()
        logger.debug("session %s opened", session.handler.tag)
        return session, read_stream

    def discard(self, session: Session) -> None:
        """Nothing more reaches the session's server: it left this worker's registry."""
        self._sessions.discard(session.session_id, session)
        session.inbound.close()

    async def forget(self, session: Session) -> None:
        """The session ended here: its state goes, unless another worker carries it on."""
        try:
            await self._backplane.forget(session)
        except StoreError as exc:
            logger.warning("session %s: %s", session.handler.tag, exc)

    async def linger(self, session: Session) -> None:
        """Return once a new session has ended. One with no message either way, and no resume
        claim, is a probe (mcp-remote opens streams it never reads): it ends as soon as its
        connection does, instead of holding its server and buffers for ``session_grace``. Any
        other session waits that long for a resume: a client that resumed before its first POST
        (while the server still held its connection, as after most network drops) wants it."""
        handler = session.handler
        await handler.detached()
        if not (session.exchanged or handler.claimed or handler.ended):
            handler.abort("its connection ended before any message arrived")
            return
        await handler.linger()

    def write_stream(self, session: Session, task_group: anyio.abc.TaskGroup) -> ServerWriteStream:
        """The write stream of the session's server, whose own requests' failures are answered
        from ``task_group``."""
        return ServerWriteStream(session, task_group, self._backplane.ledger)

    async def run(
        self,
        session: Session,
        read_stream: ReadStream[SessionMessage | Exception],
        server: Server[Any],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """A session's life with no GET of its own (taken over from another worker): its server,
        until the session ends."""
        handler = session.handler
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    server.run, read_stream, self.write_stream(session, tg), server.create_initialization_options()
                )
                task_status.started()
                try:
                    await handler.linger()
                finally:
                    self.discard(session)
                    await handler.close()
                tg.cancel_scope.cancel()  # ended for good: stop its server's requests in flight
        except Exception:
            logger.exception("session %s: the server of a session taken over failed", handler.tag)
        finally:
            await read_stream.aclose()
            with anyio.CancelScope(shield=True):
                await self.forget(session)

    async def shutdown(self) -> None:
        """Drain and end every session; each is handed off, for another worker to carry on."""
        logger.info("shutting down %d SSE session(s)", len(self._sessions))
        for _, session in self._sessions.items():
            session.handed_off = True
        await self._sessions.shutdown()
        for session_id, _ in list(self._sessions.items()):
            with suppress(StoreError):
                await self._backplane.hand_off(session_id)

    # -- POSTed messages ---------------------------------------------------------------------------

    async def deliver(self, session: Session, body: bytes, request: Request) -> Outcome:
        """Hand a POSTed body to the session's server."""
        session.exchanged = True  # no probe: a dropped connection now waits for a resume
        try:
            message = parse(body)
        except ValidationError as err:
            logger.warning("session %s: could not parse a POSTed message", session.handler.tag)
            return Outcome(400, "Could not parse message", report=partial(report_parse_error, session, body, err))
        if id_too_long(message, self._config.max_request_id_bytes):
            logger.warning("session %s: refused a request whose id is too long", session.handler.tag)
            text = id_too_long_answer(self._config.max_request_id_bytes)
            return Outcome(400, text, json=True, report=partial(report_id_too_long, session))
        return await self.deliver_message(session, message, body, request)

    async def deliver_message(
        self,
        session: Session,
        message: Message,
        body: bytes,
        request: Request,
        delivery: Delivery | None = None,
    ) -> Outcome:
        """Hand a parsed message (``body`` as POSTed) to the session's server, once per request id."""
        session.exchanged = True
        ledger = self._backplane.ledger
        async with ledger.admit(session, message, body) as admission:
            try:
                first_time = await admission.record()
            except StoreError as exc:  # not delivered; its record, if any, is undone or taken over
                logger.warning("session %s: %s", session.handler.tag, exc)
                return STORE_UNAVAILABLE
            if first_time is None:
                logger.warning("session %s: refused a request: too many unanswered", session.handler.tag)
                return Outcome(503, "Too many requests in flight", retry=True)
            if not first_time and (delivery is None or delivery.once):
                # MCP forbids reusing a request id in a session: this is a POST sent again by a
                # client that could not tell whether the first arrived. It did; the answer comes once.
                logger.info("session %s: a request was POSTed again; not delivered twice", session.handler.tag)
                return REPEATED
            try:
                await self._prepare(session, message)
                # Hand the message over before answering 202: an accepted message is never lost.
                # Shielded: a send cancelled once the server took the message cannot tell it did.
                meta = _metadata(request, ledger.on_unanswered(session, message), delivery)
                with anyio.CancelScope(shield=True):
                    await session.inbound.send(session_message(message, metadata=meta))
            except CLOSED:  # it ended here: for good, or it lives on elsewhere
                return NOT_HERE
            admission.delivered()
            await ledger.after_delivery(session, message)
        return ACCEPTED

    async def _prepare(self, session: Session, message: Message) -> None:
        """Before a session's first message reaches its server: replay the handshake of a
        client that reconnected initialized but could not resume, unless the client opens with
        ``initialize`` itself (then the handshake is the client's own, exactly as sent).

        Concurrent first POSTs wait for the replay, so none reaches a server not yet
        initialized. Raises what ``inbound.send`` raises once the session ended."""
        restore = session.restore
        if restore is None:
            return
        async with restore.lock:
            if session.restore is None:  # another POST replayed it meanwhile
                return
            session.restore = None
            if isinstance(message, types.JSONRPCRequest) and message.method == "initialize":
                return
            initialize, initialized = restored_handshake(restore.version)
            try:  # a worker taking the session over replays it too
                await self._backplane.ledger.record_restored(session, initialize, initialized)
            except StoreError as exc:
                logger.warning("session %s: the restored handshake was not stored (%s)", session.handler.tag, exc)
            logger.info(
                "session %s: a client that could not resume is back at protocol %s; its handshake is restored",
                session.handler.tag,
                restore.version,
            )
            session.swallow = initialize.id  # the client initialized long ago: it expects no answer
            try:
                await session.inbound.send(session_message(initialize))
                await session.inbound.send(session_message(initialized))
            except BaseException:
                session.restore = restore  # not replayed (the session ended, or this POST was cancelled)
                raise
