"""One session's event stream: flow control, the writer, heartbeats, deadlines, resumption.

The handler knows nothing of HTTP or of MCP: it writes encoded events to a ``sink`` coroutine
(for ASGI, one ``http.response.body`` message per call) and hands producers grants from a
:class:`~mcp_sse_transport.flow.CreditLedger`. A session outlives its connection for
``session_grace``: a later :meth:`SessionHandler.run` resumes it from an event id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import anyio
import anyio.lowlevel

from .config import SseConfig
from .errors import (
    ConnectionLostError,
    ErrorCode,
    EventTooLargeError,
    FencedError,
    SessionClosedError,
    SessionExpiredError,
    SlowConsumerError,
    StoreError,
    StoreUnavailableError,
)
from .events import HEARTBEAT, encode_error, encode_event, encode_message
from .flow import CreditLedger, Grant
from .ids import event_id_prefix, new_secret, session_tag
from .store import EventStore, InMemoryEventStore, Replay, append_riding_out

__all__ = [
    "Attachment",
    "Closed",
    "SessionHandler",
    "SessionState",
    "SessionStatistics",
    "Sink",
    "replay_chunks",
    "session_tag",
]

logger = logging.getLogger("mcp_sse_transport")

Sink = Callable[[bytes], Awaitable[None]]
"""Where a handler writes: called with one or more whole events at a time."""
Closed = Callable[[], Awaitable[object]]
"""Returns once the connection's peer has gone; awaited, and cancelled, while the stream is idle."""

_WRITE_CHUNK = 64 * 1024
"""Events ready together are joined into writes of about this many bytes: larger joins cost
more in copying than they save in sends."""
_YIELD_INTERVAL = 0.001
REPLAY_PAGE = 500
"""Events read from the store per call while replaying: a quarter of the default replay log, so a
resume of up to 500 events reads Redis once (pages of 128 made a resume of 1,000 take 13 ms, not 8)."""


async def replay_chunks(
    store: EventStore, session_id: str, id_prefix: str, after: str, until: str | None = None
) -> AsyncIterator[tuple[bytes, int, str]]:
    """The stored events after the token ``after`` up to ``until`` (``None``: the newest), as
    writes of about ``_WRITE_CHUNK`` bytes, each with its number of events and its last token.
    Read from the store :data:`REPLAY_PAGE` events at a time, so a long replay is never held
    whole. A gap (events trimmed, or the log lost since the resume was accepted) comes first, as
    a ``RESUME_GAP`` error event. Raises :class:`StoreError`."""
    prefix = id_prefix.encode()
    cursor = after
    while True:
        replay = await store.replay(session_id, cursor, until, limit=REPLAY_PAGE)
        if replay is None:
            replay = Replay([], gap=True)
        chunk: list[bytes] = []
        if replay.gap:
            logger.info("session %s: resumed past trimmed events", session_tag(session_id))
            chunk.append(encode_error(ErrorCode.RESUME_GAP, "Events after Last-Event-ID are no longer available"))
        size = 0
        for stored in replay.events:
            encoded = _encode_stored(stored.data, stored.event, prefix, stored.token)
            chunk.append(encoded)
            size += len(encoded)
            cursor = stored.token
            if size >= _WRITE_CHUNK:
                yield b"".join(chunk), len(chunk), cursor
                chunk, size = [], 0
        if chunk:
            yield b"".join(chunk), len(chunk), cursor
        if len(replay.events) < REPLAY_PAGE or cursor == until:
            return


def _encode_stored(data: bytes, event: str | None, id_prefix: bytes, token: str) -> bytes:
    if event == "message":
        return encode_message(data, id_prefix, token)
    return encode_event(data, event=event, id=(id_prefix + token.encode()).decode())


class SessionState(Enum):
    OPEN = "open"
    """Granting; writing while a connection is attached, buffering while none is."""
    CLOSING = "closing"
    """No new grants; buffered events drain, then the final event, if any, is written."""
    CLOSED = "closed"
    """Ended gracefully: everything buffered was written."""
    BROKEN = "broken"
    """Ended by a failure: slow consumer, no resume within the grace period, drain deadline."""


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """A snapshot of one session's stream."""

    session: str
    """The first 8 characters of the session id."""
    state: SessionState
    attached: bool
    """A connection is writing the session's events."""
    buffered_events: int
    """Events written by producers and not yet taken by a connection."""
    buffered_bytes: int
    reserved_events: int
    """Grants handed out and not yet spent."""
    producers_waiting: int
    events_sent: int
    """Events written to connections, replayed ones included."""
    bytes_sent: int
    """Bytes on the wire, SSE framing and heartbeats included."""
    heartbeats_sent: int
    connections: int
    """Connections that served this session: 1 plus each resume."""
    last_write: float | None
    """``anyio.current_time()`` of the last completed write, or ``None`` before the first."""


class Attachment:
    """One connection of a session, from :meth:`SessionHandler.attach` until its ``run`` ends."""

    __slots__ = ("_handler", "dead", "final", "superseded", "write_scope")

    def __init__(self, handler: SessionHandler) -> None:
        self._handler = handler
        self.dead = False
        self.superseded = False
        self.final: bytes | None = None
        self.write_scope: anyio.CancelScope | None = None

    def lost(self) -> None:
        """This connection is gone (the client disconnected): stop writing to it at once."""
        if not self.dead:
            self.dead = True
            logger.info("session %s: the client disconnected", self._handler.tag)
            self._handler._wake_writer(self)


class SessionHandler:
    """The event stream of one MCP session, with request/grant flow control.

    A producer calls :meth:`request_send` for room, then :meth:`send_event` to spend the grant on
    exactly one event; :meth:`send` does both. :meth:`run` writes events to a connection until it
    drops or the session ends; another :meth:`run` with the last event id the client saw resumes
    the session. Every failure reaches producers as an exception: :class:`SlowConsumerError`,
    :class:`SessionExpiredError` or :class:`ConnectionLostError` (all
    :class:`anyio.BrokenResourceError`) when the client is gone or too slow,
    :class:`SessionClosedError` (an :class:`anyio.ClosedResourceError`) after :meth:`close`,
    :meth:`send_error` or :meth:`shutdown`, :class:`StoreUnavailableError` once the store failed.
    Events are stored before they are written; with a store that cannot store at once, sends
    do not wait for it while a connection is attached (its writer stores them in batches), and
    :meth:`flush` returns once everything sent is stored.
    """

    __slots__ = (
        "_append_nowait",
        "_bytes_sent",
        "_changed",
        "_claims",
        "_connection",
        "_connections",
        "_deferred",
        "_events_sent",
        "_failure",
        "_final",
        "_heartbeats_sent",
        "_id_prefix",
        "_idle_scope",
        "_last_activity",
        "_last_token",
        "_last_write",
        "_ledger",
        "_newest",
        "_queue",
        "_secret",
        "_state",
        "_store",
        "_storing",
        "_yielded_at",
        "config",
        "guard",
        "session_id",
    )

    def __init__(
        self,
        session_id: str,
        config: SseConfig | None = None,
        store: EventStore | None = None,
        *,
        last_token: str | None = None,
        secret: str | None = None,
    ) -> None:
        """``last_token`` continues a session whose log already holds events (a session another
        worker took over): a resume replays the store's events up to it. ``secret`` is the
        session's resume secret, part of every event id (default: a new one)."""
        self.session_id = session_id
        self._secret = secret or new_secret()
        self.config = config or SseConfig()
        self._store = store if store is not None else InMemoryEventStore()
        self._ledger = CreditLedger(self.config.max_buffered_events, self.config.max_buffered_bytes)
        self._append_nowait: Callable[[str, str | None, bytes], str] | None = getattr(
            self._store, "append_nowait", None
        )
        self._id_prefix = event_id_prefix(session_id, self._secret).encode()
        self._queue: list[tuple[bytes, int]] = []
        self._deferred: list[tuple[str | None, bytes]] | None = None if self._append_nowait is not None else []
        """Events sent and not yet stored, with a store that cannot store at once (Redis): while a
        connection is attached, its writer stores all of them in one call before writing them, so
        producers do not wait for the store's round trips. ``None`` with a store that can (the
        in-memory one)."""
        self._storing: anyio.Lock | None = None
        self._last_token = last_token
        self._final: bytes | None = None
        self._state = SessionState.OPEN
        self._failure: tuple[type[anyio.BrokenResourceError], str] | None = None
        self._idle_scope: anyio.CancelScope | None = None
        """The writer's wait while idle: producers cancel it to wake the writer."""
        self._changed: anyio.Event | None = None
        """Created when first waited on: an idle session should cost little."""
        self._yielded_at = 0.0
        self._connection: Attachment | None = None
        self._connections = 0
        self._claims = 0
        self._newest: tuple[int, int] | None = None
        self._events_sent = 0
        self._bytes_sent = 0
        self._heartbeats_sent = 0
        self._last_write: float | None = None
        self._last_activity = 0.0
        self.guard: Callable[[], Awaitable[None]] | None = None
        """Awaited before each write of events to a connection (not of heartbeats): returns once
        this worker may write them, raises once it may not (with Redis: its lease is lost)."""

    def __repr__(self) -> str:
        return f"<SessionHandler {self.tag} {self._state.value}>"

    @property
    def tag(self) -> str:
        return session_tag(self.session_id)

    @property
    def secret(self) -> str:
        """The resume secret in every event id: a capability to read the stream, never logged."""
        return self._secret

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def attached(self) -> bool:
        return self._connection is not None

    @property
    def claimed(self) -> bool:
        """Whether a resume ever claimed the session (:meth:`claim`), here or on another worker."""
        return self._claims > 0

    @property
    def failed(self) -> bool:
        """Whether the session ended by a failure rather than by a graceful close."""
        return self._failure is not None

    @property
    def ended(self) -> bool:
        return self._state in (SessionState.CLOSED, SessionState.BROKEN)

    def _error(self) -> anyio.BrokenResourceError | anyio.ClosedResourceError:
        if self._failure is not None:
            cls, reason = self._failure
            return cls(reason)
        return SessionClosedError(f"session {self.tag} is {self._state.value}")

    def _notify_change(self) -> None:
        """Wake whoever waits for the session to attach, detach or end."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _change(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _wake(self) -> None:
        """Wake the writer: there is something to write, or to stop for."""
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    # -- producers ---------------------------------------------------------------------------

    async def request_send(self, size: int) -> Grant:
        """Wait for room for one event of ``size`` payload bytes, in FIFO order with other producers.

        Raises :class:`SlowConsumerError` if no room frees up within ``grant_timeout`` (or at once
        under the ``"disconnect"`` policy), which also ends the session; :class:`EventTooLargeError`
        at once, the session going on, for more than ``max_event_bytes``. Cancellable.
        """
        if self._state is not SessionState.OPEN:
            # A checkpoint, as anyio's streams take one: a producer looping on sends that fail
            # (the SDK swallows failed notifications) must still yield, and be cancellable.
            await anyio.lowlevel.checkpoint()
            raise self._error()
        self._check_size(size)
        grant = self._ledger.request(size)
        if grant.granted:
            return grant
        if self.config.slow_consumer_policy == "disconnect":
            self._ledger.withdraw(grant)
            self._evict("the buffer was full")
            raise self._error()
        woken = anyio.Event()
        grant.on_grant = woken.set
        try:
            with anyio.fail_after(self.config.grant_timeout):
                await woken.wait()
        except TimeoutError:
            self._ledger.withdraw(grant)
            if self._storing is not None and self._storing.locked():  # the store, not the client, is stuck
                self._store_failed(StoreError(f"storing took over {self.config.grant_timeout:g} s"))
            else:
                self._evict(f"no room freed up within {self.config.grant_timeout:g} s")
            raise self._error() from None
        except BaseException:
            self._ledger.withdraw(grant)
            raise
        if not grant.granted:  # woken because the session ended
            raise self._error()
        return grant

    def _check_size(self, size: int) -> None:
        """Refuse an event the replay log could not keep: granted, it could never be replayed."""
        if size > self.config.max_event_bytes:
            raise EventTooLargeError(size, self.config.max_event_bytes)

    async def send_event(self, grant: Grant, data: bytes | str, *, event: str | None = "message") -> None:
        """Spend ``grant`` on one event: it is stored for replay, then written as soon as the
        connection takes it.

        Raises :class:`GrantError` without a grant, with a spent one, another session's, or one
        smaller than ``data``.
        """
        if isinstance(data, str):
            data = data.encode()
        if self._state is not SessionState.OPEN:
            self._ledger.withdraw(grant)
            raise self._error()
        self._ledger.commit(grant, len(data))
        if self._accept(data, event):
            await self.flush()  # detached: stored now, so it survives this process

    def _accept(self, data: bytes, event: str | None) -> bool:
        """Take a granted event: stored and queued at once, or deferred for the writer to store.
        True if the producer should store it itself: no connection will, soon."""
        if self._deferred is None:
            assert self._append_nowait is not None
            self._enqueue(data, event, self._append_nowait(self.session_id, event, data))
            return False
        self._deferred.append((event, data))
        self._wake()
        return self._connection is None

    async def flush(self) -> None:
        """Return once every event sent so far is in the store. A store that cannot store at once
        (Redis) gets events in batches, from the writer; this stores what is left now, for a
        caller that must know an event will survive this process (a response, say).

        Raises :class:`StoreUnavailableError` if the store fails, which ends the session with a
        ``STORE_UNAVAILABLE`` error event (an event that cannot be replayed is never written),
        or the session's error if it has ended.
        """
        if self._deferred is not None and not await self._store_deferred():
            raise self._error()

    async def _store_deferred(self) -> bool:
        """Store the deferred events in one call, in order, and queue them for writing; False if
        the session ended (the store failed, or something else ended it meanwhile)."""
        if self._storing is None:
            self._storing = anyio.Lock()
        async with self._storing:  # also waits for a batch another task is storing
            batch, self._deferred = self._deferred or [], []
            if batch:
                try:
                    # Shielded: a batch taken and not stored would be lost, its room never given back.
                    # A store that fails is tried again for up to grant_timeout: meanwhile the
                    # events wait in the bounded buffer, and producers wait for grants.
                    with anyio.CancelScope(shield=True):
                        tokens = await append_riding_out(
                            self._store,
                            self.session_id,
                            batch,
                            after=self._last_token,
                            within=self.config.grant_timeout,
                        )
                except FencedError as exc:
                    self._moved(exc)
                    return False
                except StoreError as exc:
                    self._store_failed(exc)
                    return False
                if not self.ended:
                    for (event, data), token in zip(batch, tokens, strict=True):
                        self._enqueue(data, event, token)
        return not self.ended

    def _moved(self, exc: FencedError) -> None:
        """Another worker serves the session now: end it here at once, with no final event (the
        client's resume finds it there), and nothing more stored or written from here."""
        logger.warning("session %s: its stream here ends (%s)", self.tag, exc)
        self._fail(ConnectionLostError, "another worker serves the session now")

    def _store_failed(self, exc: StoreError) -> None:
        logger.error("session %s: the event store failed (%s); the session ends", self.tag, exc)
        final = encode_error(ErrorCode.STORE_UNAVAILABLE, "Session store unavailable; the session ends")
        self._fail(StoreUnavailableError, "the event store failed", final=final)

    def _enqueue(self, data: bytes, event: str | None, token: str) -> None:
        self._last_token = token
        self._queue.append((_encode_stored(data, event, self._id_prefix, token), len(data)))
        self._wake()

    async def send(self, data: bytes | str, *, event: str | None = "message") -> None:
        """Request a grant for ``data`` and spend it: the whole flow-controlled send.

        When there is room and nobody waits, the event is buffered at once, without a grant
        object, and the producer yields to other tasks at least every millisecond, so a burst
        of sends never holds the event loop.
        """
        if isinstance(data, str):
            data = data.encode()
        self._check_size(len(data))
        if self._state is SessionState.OPEN and self._ledger.take(len(data)):
            if self._accept(data, event):
                await self.flush()  # detached: stored now, so it survives this process
                return
            now = time.monotonic()
            if now - self._yielded_at >= _YIELD_INTERVAL:
                self._yielded_at = now
                await anyio.lowlevel.checkpoint()
            return
        grant = await self.request_send(len(data))
        await self.send_event(grant, data, event=event)

    async def send_error(self, code: int, message: str, data: Any = None) -> None:
        """Write ``event: error`` with ``{code, message, data}`` after what is buffered, then close."""
        await self._close(encode_error(code, message, data))

    async def close(self) -> None:
        """Stop granting, write what is buffered within ``drain_timeout``, and end the stream."""
        await self._close(None)

    async def shutdown(self) -> None:
        """Close for a server shutdown: the final event tells the client when to come back."""
        await self._close(encode_error(ErrorCode.SERVER_SHUTDOWN, "Server shutting down", retry=self.config.retry_ms))

    def abort(self, reason: str) -> None:
        """End the session at once, without draining (its server is going away): producers get
        :class:`ConnectionLostError`, the connection is dropped."""
        self._fail(ConnectionLostError, reason)

    def connection_lost(self) -> None:
        """The current connection is gone: stop writing; the session waits ``session_grace``."""
        if self._connection is not None:
            self._connection.lost()

    async def supersede(self) -> None:
        """End the current connection's stream with ``SUPERSEDED``, so a new one can attach."""
        connection = self._connection
        if connection is None:
            return
        connection.superseded = True
        connection.final = encode_error(ErrorCode.SUPERSEDED, "Another connection resumed this session")
        self._wake_writer(connection)
        with anyio.move_on_after(self.config.drain_timeout, shield=True):
            while self._connection is connection:
                await self._change().wait()
        if self._connection is connection:
            connection.dead = True
            self._wake_writer(connection)

    def _wake_writer(self, connection: Attachment) -> None:
        self._wake()
        if connection.write_scope is not None and (connection.dead or connection.superseded):
            connection.write_scope.cancel()

    async def linger(self) -> None:
        """Return once the session has ended: closed, failed, or detached past ``session_grace``."""
        while not self.ended:
            changed = self._change()
            if self._connection is not None:
                await changed.wait()
                continue
            with anyio.move_on_after(self.config.session_grace):
                await changed.wait()
            if self._connection is None and not self.ended and not changed.is_set():
                self._fail(SessionExpiredError, f"no resume within {self.config.session_grace:g} s")

    async def detached(self) -> None:
        """Return once no connection is attached (at once if none is), or the session has ended."""
        while self._connection is not None and not self.ended:
            await self._change().wait()

    # -- ending ------------------------------------------------------------------------------

    async def _close(self, final: bytes | None) -> None:
        if self._state is SessionState.OPEN:
            self._state = SessionState.CLOSING
            self._final = final
            self._ledger.fail_waiting()
            self._wake()
            logger.debug("session %s closing", self.tag)
            if self._connection is None and not self._queue and not self._deferred:
                self._end(SessionState.CLOSED)  # nothing left to deliver
            # Detached with events buffered: a resume within drain_timeout still delivers them.
        with anyio.move_on_after(self.config.drain_timeout, shield=True):
            while not self.ended:
                await self._change().wait()
        if not self.ended:
            self._fail(ConnectionLostError, f"buffered events did not drain within {self.config.drain_timeout:g} s")

    def _end(self, state: SessionState) -> None:
        self._state = state
        self._queue.clear()
        if self._deferred:
            self._deferred.clear()
        self._ledger.fail_waiting()
        self._ledger.release(self._ledger.buffered_events, self._ledger.buffered_bytes)
        self._notify_change()

    def _evict(self, reason: str) -> None:
        if self._state is not SessionState.OPEN:
            return
        stats = self.statistics()
        logger.warning(
            "session %s: slow consumer cut loose (%s; %d events, %d bytes buffered)",
            self.tag,
            reason,
            stats.buffered_events,
            stats.buffered_bytes,
        )
        self._fail(
            SlowConsumerError,
            f"slow consumer: {reason}",
            final=encode_error(
                ErrorCode.SLOW_CONSUMER,
                "Client too slow: events were not read in time",
                {"max_buffered_events": self.config.max_buffered_events, "grant_timeout": self.config.grant_timeout},
            ),
        )

    def _fail(self, cls: type[anyio.BrokenResourceError], reason: str, *, final: bytes | None = None) -> None:
        """End the session by a failure: every producer gets ``cls``, the buffer is dropped."""
        if self.ended:
            return
        if cls is not SlowConsumerError:
            logger.info("session %s ended: %s", self.tag, reason)
        self._failure = (cls, reason)
        connection = self._connection
        if connection is not None:
            connection.final = final
            connection.dead = True
            self._wake_writer(connection)
        self._end(SessionState.BROKEN)

    # -- the writer --------------------------------------------------------------------------

    def claim(self, sequence: int | None = None) -> tuple[int, int]:
        """Take a place in line to attach, for a resume that drew ``sequence`` from the
        session's :class:`~mcp_sse_transport.claims.ClaimSequence` as it arrived (on whichever
        worker it reached; default: after every claim taken so far). :meth:`attach_latest` with
        it attaches only if no resume arrived later: the last to arrive wins, however long each
        takes to get its turn (a worker may wait out a dead owner's lease first). No clock is
        read: a clock stepped back, or skewed between workers, cannot reorder resumes."""
        self._claims += 1
        if sequence is None:
            sequence = self._newest[0] if self._newest is not None else 0
        claim = (sequence, self._claims)
        if self._newest is None or claim > self._newest:
            self._newest = claim
        return claim

    async def attach_latest(self, claim: tuple[int, int]) -> Attachment | None:
        """Supersede whatever connection is attached, then attach, unless a resume that arrived
        later claimed the session: then ``None``, and the caller's connection should be dropped."""
        while claim == self._newest and self._connection is not None:
            await self.supersede()
        return self.attach() if claim == self._newest else None

    def attach(self) -> Attachment:
        """Claim the session for a new connection; ``run`` it next. A connection still attached
        must be superseded first."""
        if self._connection is not None:
            raise RuntimeError("a connection is attached: supersede it first")
        connection = self._connection = Attachment(self)
        self._connections += 1
        self._notify_change()
        return connection

    async def run(
        self,
        sink: Sink,
        *,
        preface: bytes = b"",
        after: str | None = None,
        attachment: Attachment | None = None,
        closed: Closed | None = None,
    ) -> bool:
        """Write ``preface``, then (when resuming) every stored event after the token ``after``,
        then live events, until the connection drops or the session ends. ``closed`` returns once
        the peer has gone (for ASGI: ``http.disconnect``); ``attachment`` comes from :meth:`attach`,
        else ``run`` attaches.

        Returns whether the stream ended gracefully, so its terminator should be written; False
        means the connection should be dropped. Events that are ready together go out in one
        ``sink`` call; their room is given back to producers only once the write completed, so
        the buffer bounds what is in flight too.
        """
        connection = attachment if attachment is not None else self.attach()
        if connection is not self._connection:
            raise RuntimeError("this attachment was superseded or has already run")
        self._last_activity = anyio.current_time()
        try:
            if self.ended:
                return False
            if (not preface or await self._write(sink, connection, preface)) and (
                after is None or await self._replay(sink, connection, after)
            ):
                await self._pump(sink, connection, closed)
            final = connection.final if connection.final is not None else self._final
            if final is not None and (not connection.dead or self.ended):
                # After a failure the client is likely stuck: one short, bounded try.
                timeout = min(self.config.write_timeout, self.config.drain_timeout)
                await self._write(sink, connection, final, force=True, within=timeout)
            if self._state is SessionState.CLOSING and not connection.dead:
                self._end(SessionState.CLOSED)
                logger.debug("session %s closed", self.tag)
            return self._state is SessionState.CLOSED or (connection.superseded and not connection.dead)
        finally:
            if self._connection is connection:
                self._connection = None
            if self._state is SessionState.CLOSING:
                self._fail(ConnectionLostError, "the connection dropped while draining")
            elif self._state is SessionState.OPEN and self.config.session_grace == 0:
                self._fail(ConnectionLostError, "the connection dropped")
            self._notify_change()

    async def _replay(self, sink: Sink, connection: Attachment, after: str) -> bool:
        """Re-send, from the store, every event after ``after`` up to the newest: buffered events
        included, which is why the buffer is emptied first. Events produced meanwhile queue up."""
        if self._deferred is not None and not await self._store_deferred():
            return False
        cut = self._last_token
        self._queue.clear()
        # The room of everything stored is given back (it is replayed from the store, and what a
        # dropped connection had in flight is never released by it); events sent since keep theirs.
        deferred = self._deferred or ()
        self._ledger.release(
            self._ledger.buffered_events - len(deferred),
            self._ledger.buffered_bytes - sum(len(data) for _, data in deferred),
        )
        if cut is None:
            return True
        try:
            async for chunk, events, _ in replay_chunks(
                self._store, self.session_id, self._id_prefix.decode(), after, cut
            ):
                if not await self._write(sink, connection, chunk):
                    return False
                self._events_sent += events
        except StoreError as exc:
            logger.warning("session %s: could not replay (%s); dropping the connection", self.tag, exc)
            return False
        return True

    async def _pump(self, sink: Sink, connection: Attachment, closed: Closed | None) -> None:
        """Write buffered events, or a heartbeat when idle, until this connection stops. While
        idle the writer awaits ``closed`` itself: one task serves the connection both ways."""
        while not (connection.dead or connection.superseded):
            if self._deferred:
                if not await self._store_deferred():
                    return
                continue
            if self._queue:
                chunk, events, size = self._take()
                if not await self._write(sink, connection, chunk):
                    return
                self._events_sent += events
                if not self.ended:
                    self._ledger.release(events, size)
                continue
            if self._state is not SessionState.OPEN:
                return
            idle = self.config.heartbeat_interval - (anyio.current_time() - self._last_activity)
            if idle <= 0:
                if not await self._write(sink, connection, HEARTBEAT):
                    return
                self._heartbeats_sent += 1
                continue
            # Idle: watch the connection until the heartbeat is due or a producer wakes us.
            with anyio.CancelScope(deadline=anyio.current_time() + idle) as self._idle_scope:
                try:
                    if closed is None:
                        await anyio.sleep_forever()
                    else:
                        await closed()
                        connection.lost()
                finally:
                    self._idle_scope = None

    def _take(self) -> tuple[bytes, int, int]:
        """The events at the head of the queue, at least one, joined up to about ``_WRITE_CHUNK``
        bytes; returns the chunk, its events and their payload bytes."""
        queue = self._queue
        count, total = 0, 0
        for encoded, _ in queue:
            if count and total + len(encoded) > _WRITE_CHUNK:
                break
            count += 1
            total += len(encoded)
        taken = queue[:count]
        del queue[:count]
        chunk = taken[0][0] if count == 1 else b"".join(item[0] for item in taken)
        return chunk, count, sum(item[1] for item in taken)

    async def _write(
        self, sink: Sink, connection: Attachment, chunk: bytes, *, force: bool = False, within: float | None = None
    ) -> bool:
        """One write under ``write_timeout``; False, with the connection marked dead, if it fails.
        ``force`` writes a final event to a connection that is ending."""
        if (connection.dead or connection.superseded) and not force:
            return False
        deadline = anyio.current_time() + (self.config.write_timeout if within is None else within)
        with anyio.CancelScope(deadline=deadline) as scope:
            connection.write_scope = scope
            try:
                if self.guard is not None and chunk is not HEARTBEAT:
                    await self.guard()  # a fenced worker writes nothing more: the session lives elsewhere
                await sink(chunk)
            except Exception as exc:  # any failure to write means the connection is unusable
                logger.info("session %s: write failed (%s)", self.tag, type(exc).__name__)
                connection.dead = True
                return False
            finally:
                connection.write_scope = None
        if scope.cancelled_caught:
            if not (connection.dead or connection.superseded):
                logger.info("session %s: a write stalled for %g s", self.tag, self.config.write_timeout)
            connection.dead = True
            return False
        self._last_write = self._last_activity = anyio.current_time()
        self._bytes_sent += len(chunk)
        return True

    def statistics(self) -> SessionStatistics:
        ledger = self._ledger
        return SessionStatistics(
            session=self.tag,
            state=self._state,
            attached=self._connection is not None,
            buffered_events=ledger.buffered_events,
            buffered_bytes=ledger.buffered_bytes,
            reserved_events=ledger.reserved_events,
            producers_waiting=ledger.waiting,
            events_sent=self._events_sent,
            bytes_sent=self._bytes_sent,
            heartbeats_sent=self._heartbeats_sent,
            connections=self._connections,
            last_write=self._last_write,
        )
