"""One session's event stream, driven with anyio: producers' grants, closing, lingering, resumes.

The handler knows nothing of HTTP or of MCP: it writes encoded events to a ``sink`` coroutine
(for ASGI, one ``http.response.body`` message per call) and hands producers grants from a
:class:`~mcp_sse_transport.flow.CreditLedger`. What the stream is, and which transitions it may
take, is the pure :class:`~mcp_sse_transport.stream_state.StreamState`; writing it to a
connection is :class:`~mcp_sse_transport.writer.StreamWriter`'s, this class's base. A session
outlives its connection for ``session_grace``: a later :meth:`SessionHandler.run` resumes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from .config import SseConfig
from .errors import (
    ConnectionLostError,
    ErrorCode,
    EventTooLargeError,
    SessionClosedError,
    SessionExpiredError,
    SlowConsumerError,
    StoreError,
    StoreUnavailableError,
)
from .events import encode_error
from .flow import CreditLedger, Grant
from .ids import event_id_prefix, new_secret, session_tag
from .replay import REPLAY_PAGE, replay_chunks
from .store import EventStore, InMemoryEventStore
from .stream_state import FailureKind, SessionState, SessionStatistics, StreamState
from .writer import Attachment, Closed, Sink, StreamWriter

__all__ = [
    "REPLAY_PAGE",
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

_YIELD_INTERVAL = 0.001
_ERRORS: dict[FailureKind, type[anyio.BrokenResourceError]] = {
    FailureKind.SLOW_CONSUMER: SlowConsumerError,
    FailureKind.CONNECTION_LOST: ConnectionLostError,
    FailureKind.EXPIRED: SessionExpiredError,
    FailureKind.STORE_UNAVAILABLE: StoreUnavailableError,
    FailureKind.MOVED: ConnectionLostError,
}
"""What producers of a session that broke get, by why it broke."""


class SessionHandler(StreamWriter):
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

    __slots__ = ("_append_nowait", "_ledger", "_secret", "_yielded_at")

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
        config = config or SseConfig()
        store = store if store is not None else InMemoryEventStore()
        self._secret = secret or new_secret()
        self._append_nowait: Callable[[str, str | None, bytes], str] | None = getattr(store, "append_nowait", None)
        self._ledger = CreditLedger(config.max_buffered_events, config.max_buffered_bytes)
        # With a store that cannot store at once (Redis), sent events are deferred: while a
        # connection is attached its writer stores them in one call before writing them, so
        # producers do not wait for the store's round trips.
        stream: StreamState[Attachment] = StreamState(
            self._ledger, deferred=self._append_nowait is None, last_token=last_token
        )
        super().__init__(session_id, config, store, stream, event_id_prefix(session_id, self._secret).encode())
        self._yielded_at = 0.0

    def __repr__(self) -> str:
        return f"<SessionHandler {self.tag} {self._stream.state.value}>"

    @property
    def secret(self) -> str:
        """The resume secret in every event id: a capability to read the stream, never logged."""
        return self._secret

    @property
    def state(self) -> SessionState:
        return self._stream.state

    @property
    def last_token(self) -> str | None:
        """The token of the newest event stored, for a handler that continues this one's log."""
        return self._stream.last_token

    @property
    def attached(self) -> bool:
        return self._stream.connection is not None

    @property
    def claimed(self) -> bool:
        """Whether a resume ever claimed the session (:meth:`claim`), here or on another worker."""
        return self._stream.claims > 0

    @property
    def failure(self) -> FailureKind | None:
        """Why the session broke, if it did."""
        failure = self._stream.failure
        return failure[0] if failure is not None else None

    @property
    def failed(self) -> bool:
        """Whether the session ended by a failure rather than by a graceful close."""
        return self._stream.failure is not None

    def _error(self) -> anyio.BrokenResourceError | anyio.ClosedResourceError:
        failure = self._stream.failure
        if failure is not None:
            kind, reason = failure
            return _ERRORS[kind](reason)
        return SessionClosedError(f"session {self.tag} is {self._stream.state.value}")

    # -- producers ---------------------------------------------------------------------------

    async def request_send(self, size: int) -> Grant:
        """Wait for room for one event of ``size`` payload bytes, in FIFO order with other producers.

        Raises :class:`SlowConsumerError` if no room frees up within ``grant_timeout`` (or at once
        under the ``"disconnect"`` policy), which also ends the session; :class:`EventTooLargeError`
        at once, the session going on, for more than ``max_event_bytes``. Cancellable.
        """
        if self._stream.state is not SessionState.OPEN:
            # A checkpoint, as anyio's streams take one: a producer looping on sends that fail
            # (the SDK swallows failed notifications) must still yield, and be cancellable.
            await anyio.lowlevel.checkpoint()
            raise self._error()
        self._check_size(size)
        ledger = self._ledger
        grant = ledger.request(size)
        if grant.granted:
            return grant
        if self.config.slow_consumer_policy == "disconnect":
            ledger.withdraw(grant)
            self._evict("the buffer was full")
            raise self._error()
        woken = anyio.Event()
        grant.on_grant = woken.set
        try:
            with anyio.fail_after(self.config.grant_timeout):
                await woken.wait()
        except TimeoutError:
            ledger.withdraw(grant)
            if self._storing is not None and self._storing.locked():  # the store, not the client, is stuck
                self._store_failed(StoreError(f"storing took over {self.config.grant_timeout:g} s"))
            else:
                self._evict(f"no room freed up within {self.config.grant_timeout:g} s")
            raise self._error() from None
        except BaseException:
            ledger.withdraw(grant)
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
        if self._stream.state is not SessionState.OPEN:
            self._ledger.withdraw(grant)
            raise self._error()
        self._ledger.commit(grant, len(data))
        if self._accept(data, event):
            await self.flush()  # detached: stored now, so it survives this process

    def _accept(self, data: bytes, event: str | None) -> bool:
        """Take a granted event: stored and queued at once, or deferred for the writer to store.
        True if the producer should store it itself: no connection will, soon."""
        if self._append_nowait is not None:
            self._enqueue(data, event, self._append_nowait(self.session_id, event, data))
            return False
        self._stream.defer(event, data)
        self._wake()
        return self._stream.connection is None

    async def flush(self) -> None:
        """Return once every event sent so far is in the store. A store that cannot store at once
        (Redis) gets events in batches, from the writer; this stores what is left now, for a
        caller that must know an event will survive this process (a response, say).

        Raises :class:`StoreUnavailableError` if the store fails, which ends the session with a
        ``STORE_UNAVAILABLE`` error event (an event that cannot be replayed is never written),
        or the session's error if it has ended.
        """
        if self._stream.deferred is not None and not await self._store_deferred():
            raise self._error()

    async def send(self, data: bytes | str, *, event: str | None = "message") -> None:
        """Request a grant for ``data`` and spend it: the whole flow-controlled send.

        When there is room and nobody waits, the event is buffered at once, without a grant
        object, and the producer yields to other tasks at least every millisecond, so a burst
        of sends never holds the event loop.
        """
        if isinstance(data, str):
            data = data.encode()
        self._check_size(len(data))
        if self._stream.state is SessionState.OPEN and self._ledger.take(len(data)):
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
        self._fail(FailureKind.CONNECTION_LOST, reason)

    def connection_lost(self) -> None:
        """The current connection is gone: stop writing; the session waits ``session_grace``."""
        if self._stream.connection is not None:
            self._stream.connection.lost()

    async def supersede(self) -> None:
        """End the current connection's stream with ``SUPERSEDED``, so a new one can attach."""
        await self._end_connection(encode_error(ErrorCode.SUPERSEDED, "Another connection resumed this session"))

    async def release(self) -> None:
        """End the current connection's stream cleanly once the write in flight is done, the
        session staying open: the client comes back with ``Last-Event-ID`` after ``retry:``
        (Streamable HTTP's polling). What is queued waits for that resume."""
        await self._end_connection(None, cut=False)

    async def _end_connection(self, final: bytes | None, *, cut: bool = True) -> None:
        """End the attached connection's stream with ``final``: at once (``cut``: the write in
        flight is cancelled), or after the write in flight."""
        connection = self._stream.supersede(final)
        if connection is None:
            return
        if cut:
            self._wake_writer(connection)
        else:
            self._wake()
        with anyio.move_on_after(self.config.drain_timeout, shield=True):
            while self._stream.connection is connection:
                await self._change().wait()
        if self._stream.connection is connection:
            connection.dead = True
            self._wake_writer(connection)

    async def linger(self) -> None:
        """Return once the session has ended: closed, failed, or detached past ``session_grace``."""
        while not self.ended:
            changed = self._change()
            if self._stream.connection is not None:
                await changed.wait()
                continue
            with anyio.move_on_after(self.config.session_grace):
                await changed.wait()
            if self._stream.lingering and not changed.is_set():
                self._stream.expire(f"no resume within {self.config.session_grace:g} s")
                self._failed()

    async def detached(self) -> None:
        """Return once no connection is attached (at once if none is), or the session has ended."""
        while self._stream.connection is not None and not self.ended:
            await self._change().wait()

    # -- ending ------------------------------------------------------------------------------

    async def _close(self, final: bytes | None) -> None:
        if self._stream.close(final):
            self._wake()
            logger.debug("session %s closing", self.tag)
            if self.ended:  # nothing was left to deliver
                self._notify_change()
        with anyio.move_on_after(self.config.drain_timeout, shield=True):
            while not self.ended:
                await self._change().wait()
        if not self.ended:
            reason = f"buffered events did not drain within {self.config.drain_timeout:g} s"
            self._fail(FailureKind.CONNECTION_LOST, reason)

    def _evict(self, reason: str) -> None:
        if self._stream.state is not SessionState.OPEN:
            return
        stats = self.statistics()
        logger.warning(
            "session %s: slow consumer cut loose (%s; %d events, %d bytes buffered)",
            self.tag,
            reason,
            stats.buffered_events,
            stats.buffered_bytes,
        )
        final = encode_error(
            ErrorCode.SLOW_CONSUMER,
            "Client too slow: events were not read in time",
            {"max_buffered_events": self.config.max_buffered_events, "grant_timeout": self.config.grant_timeout},
        )
        if self._stream.evict(reason, final):
            self._failed()

    # -- resumes ----------------------------------------------------------------------------

    def claim(self, sequence: int | None = None) -> tuple[int, int]:
        """Take a place in line to attach, for a resume that drew ``sequence`` from the
        session's :class:`~mcp_sse_transport.claims.ClaimSequence` as it arrived (on whichever
        worker it reached; default: after every claim taken so far). :meth:`attach_latest` with
        it attaches only if no resume arrived later: the last to arrive wins, however long each
        takes to get its turn (a worker may wait out a dead owner's lease first). No clock is
        read: a clock stepped back, or skewed between workers, cannot reorder resumes."""
        return self._stream.claim(sequence)

    async def attach_latest(self, claim: tuple[int, int]) -> Attachment | None:
        """Supersede whatever connection is attached, then attach, unless a resume that arrived
        later claimed the session: then ``None``, and the caller's connection should be dropped."""
        while self._stream.is_latest(claim) and self._stream.connection is not None:
            await self.supersede()
        return self.attach() if self._stream.is_latest(claim) else None

    def statistics(self) -> SessionStatistics:
        return self._stream.statistics(self.tag)
