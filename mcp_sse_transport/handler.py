"""One session's event stream: flow control, the writer, heartbeats, deadlines and shutdown.

The handler knows nothing of HTTP or of MCP: it writes encoded events to a ``sink`` coroutine
(for ASGI, one ``http.response.body`` message per call) and hands producers grants from a
:class:`~mcp_sse_transport.flow.CreditLedger`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import anyio

from .config import SseConfig
from .errors import ConnectionLostError, ErrorCode, SessionClosedError, SlowConsumerError
from .events import HEARTBEAT, encode_error, encode_event
from .flow import CreditLedger, Grant

__all__ = ["SessionHandler", "SessionState", "SessionStatistics", "Sink", "session_tag"]

logger = logging.getLogger("mcp_sse_transport")

Sink = Callable[[bytes], Awaitable[None]]
"""Where a handler writes: called with one or more whole events at a time."""


def session_tag(session_id: str) -> str:
    """The part of a session id that may appear in logs and statistics (the id is a capability)."""
    return session_id[:8]


class SessionState(Enum):
    OPEN = "open"
    """Granting and writing."""
    CLOSING = "closing"
    """No new grants; buffered events drain, then the final event, if any, is written."""
    CLOSED = "closed"
    """Ended gracefully: everything buffered was written."""
    BROKEN = "broken"
    """Ended by a failure: client gone, write stalled, slow consumer, or drain deadline missed."""


@dataclass(frozen=True, slots=True)
class SessionStatistics:
    """A snapshot of one session's stream."""

    session: str
    """The first 8 characters of the session id."""
    state: SessionState
    buffered_events: int
    """Events written by producers and not yet written to the connection."""
    buffered_bytes: int
    reserved_events: int
    """Grants handed out and not yet spent."""
    producers_waiting: int
    events_sent: int
    bytes_sent: int
    """Bytes on the wire, SSE framing and heartbeats included."""
    heartbeats_sent: int
    last_write: float | None
    """``anyio.current_time()`` of the last completed write, or ``None`` before the first."""


class SessionHandler:
    """The event stream of one MCP session, with request/grant flow control.

    A producer calls :meth:`request_send` for room, then :meth:`send_event` to spend the grant on
    exactly one event; :meth:`send` does both. :meth:`run` writes events to the connection until
    the session ends. Every failure reaches producers as an exception: :class:`SlowConsumerError`
    or :class:`ConnectionLostError` (both :class:`anyio.BrokenResourceError`) when the client is
    gone or too slow, :class:`SessionClosedError` (an :class:`anyio.ClosedResourceError`) after
    :meth:`close`, :meth:`send_error` or :meth:`shutdown`.
    """

    def __init__(self, session_id: str, config: SseConfig | None = None) -> None:
        self.session_id = session_id
        self.config = config or SseConfig()
        self._ledger = CreditLedger(self.config.max_buffered_events, self.config.max_buffered_bytes)
        self._queue: deque[tuple[bytes, int]] = deque()
        self._final: bytes | None = None
        self._state = SessionState.OPEN
        self._failure: tuple[type[anyio.BrokenResourceError], str] | None = None
        self._ready = anyio.Event()
        self._finished = anyio.Event()
        self._started = False
        self._write_scope: anyio.CancelScope | None = None
        self._events_sent = 0
        self._bytes_sent = 0
        self._heartbeats_sent = 0
        self._last_write: float | None = None
        self._last_activity = 0.0

    def __repr__(self) -> str:
        return f"<SessionHandler {self.tag} {self._state.value}>"

    @property
    def tag(self) -> str:
        return session_tag(self.session_id)

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def failed(self) -> bool:
        """Whether the session ended by a failure rather than by a graceful close."""
        return self._failure is not None

    def _error(self) -> anyio.BrokenResourceError | anyio.ClosedResourceError:
        if self._failure is not None:
            cls, reason = self._failure
            return cls(reason)
        return SessionClosedError(f"session {self.tag} is {self._state.value}")

    # -- producers ---------------------------------------------------------------------------

    async def request_send(self, size: int) -> Grant:
        """Wait for room for one event of ``size`` payload bytes, in FIFO order with other producers.

        Raises :class:`SlowConsumerError` if no room frees up within ``grant_timeout`` (or at once
        under the ``"disconnect"`` policy), which also ends the session. Cancellable.
        """
        if self._state is not SessionState.OPEN:
            raise self._error()
        woken = anyio.Event()
        grant = self._ledger.request(size, woken.set)
        if grant.granted:
            return grant
        if self.config.slow_consumer_policy == "disconnect":
            self._ledger.withdraw(grant)
            self._evict("the buffer was full")
            raise self._error()
        try:
            with anyio.fail_after(self.config.grant_timeout):
                await woken.wait()
        except TimeoutError:
            self._ledger.withdraw(grant)
            self._evict(f"no room freed up within {self.config.grant_timeout:g} s")
            raise self._error() from None
        except BaseException:
            self._ledger.withdraw(grant)
            raise
        if not grant.granted:  # woken because the session ended
            raise self._error()
        return grant

    async def send_event(self, grant: Grant, data: bytes | str, *, event: str | None = "message") -> None:
        """Spend ``grant`` on one event; it is written as soon as the connection takes it.

        Raises :class:`GrantError` without a grant, with a spent one, another session's, or one
        smaller than ``data``.
        """
        if isinstance(data, str):
            data = data.encode()
        if self._state is not SessionState.OPEN:
            self._ledger.withdraw(grant)
            raise self._error()
        encoded = encode_event(data, event=event)
        self._ledger.commit(grant, len(data))
        self._queue.append((encoded, len(data)))
        self._ready.set()

    async def send(self, data: bytes | str, *, event: str | None = "message") -> None:
        """Request a grant for ``data`` and spend it: the whole flow-controlled send."""
        if isinstance(data, str):
            data = data.encode()
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
        await self._close(
            encode_error(
                ErrorCode.SERVER_SHUTDOWN,
                "Server shutting down",
                retry=self.config.retry_ms,
            )
        )

    def connection_lost(self) -> None:
        """The client went away: release producers, memory and the writer at once."""
        self._fail(ConnectionLostError, "the client disconnected")

    # -- ending ------------------------------------------------------------------------------

    async def _close(self, final: bytes | None) -> None:
        if self._state is SessionState.OPEN:
            self._state = SessionState.CLOSING
            self._final = final
            self._ledger.fail_waiting()
            self._ready.set()
            if not self._started:
                self._state = SessionState.CLOSED
                self._finished.set()
            logger.debug("session %s closing", self.tag)
        with anyio.move_on_after(self.config.drain_timeout, shield=True):
            await self._finished.wait()
        if not self._finished.is_set():
            self._fail(ConnectionLostError, f"buffered events did not drain within {self.config.drain_timeout:g} s")

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
        if self._state in (SessionState.BROKEN, SessionState.CLOSED):
            return
        if cls is ConnectionLostError:
            logger.info("session %s: %s", self.tag, reason)
        self._state = SessionState.BROKEN
        self._failure = (cls, reason)
        self._final = final
        self._queue.clear()
        self._ledger.fail_waiting()
        self._ledger.release(self._ledger.buffered_events, self._ledger.buffered_bytes)
        self._ready.set()
        if self._write_scope is not None:
            self._write_scope.cancel()
        if not self._started:
            self._finished.set()

    # -- the writer --------------------------------------------------------------------------

    async def run(self, sink: Sink, *, preface: bytes = b"") -> None:
        """Write ``preface``, then events, to ``sink`` until the session ends. Returns normally
        either way: check :attr:`failed` to tell a graceful end (write the stream's terminator)
        from a broken one.

        Events that are ready together go out in one ``sink`` call; their room is given back to
        producers only once the write completed, so the buffer bounds what is in flight too.
        """
        if self._started:
            raise RuntimeError("a session handler runs once")
        self._started = True
        self._last_activity = anyio.current_time()
        try:
            if not preface or await self._write(sink, preface):
                await self._pump(sink)
            if self._final is not None:
                final, self._final = self._final, None
                if self._state is SessionState.BROKEN:
                    # The client is likely stuck: give the farewell one short, bounded try.
                    with anyio.move_on_after(min(self.config.write_timeout, self.config.drain_timeout)):
                        await self._write(sink, final)
                else:
                    await self._write(sink, final)
            if self._state is SessionState.CLOSING:
                self._state = SessionState.CLOSED
                logger.debug("session %s closed", self.tag)
        finally:
            if self._state in (SessionState.OPEN, SessionState.CLOSING):
                self._fail(ConnectionLostError, "the writer stopped")
            self._finished.set()

    async def _pump(self, sink: Sink) -> None:
        """Write buffered events, or a heartbeat when idle, until the session stops being open."""
        while True:
            if self._queue:
                chunks = [item[0] for item in self._queue]
                events = len(chunks)
                size = sum(item[1] for item in self._queue)
                self._queue.clear()
                if not await self._write(sink, chunks[0] if events == 1 else b"".join(chunks)):
                    return
                self._events_sent += events
                if self._state is SessionState.BROKEN:  # failed while the write completed
                    return
                self._ledger.release(events, size)
                continue
            if self._state is not SessionState.OPEN:
                return
            idle = self.config.heartbeat_interval - (anyio.current_time() - self._last_activity)
            if idle <= 0:
                if not await self._write(sink, HEARTBEAT):
                    return
                self._heartbeats_sent += 1
                continue
            self._ready = anyio.Event()
            with anyio.move_on_after(idle):
                await self._ready.wait()

    async def _write(self, sink: Sink, chunk: bytes) -> bool:
        with anyio.CancelScope(deadline=anyio.current_time() + self.config.write_timeout) as scope:
            self._write_scope = scope
            try:
                await sink(chunk)
            except Exception as exc:  # any failure to write means the connection is unusable
                self._fail(ConnectionLostError, f"write failed ({type(exc).__name__})")
                return False
            finally:
                self._write_scope = None
        if scope.cancelled_caught:
            self._fail(ConnectionLostError, f"a write stalled for {self.config.write_timeout:g} s")
            return False
        self._last_write = self._last_activity = anyio.current_time()
        self._bytes_sent += len(chunk)
        return True

    def statistics(self) -> SessionStatistics:
        ledger = self._ledger
        return SessionStatistics(
            session=self.tag,
            state=self._state,
            buffered_events=ledger.buffered_events,
            buffered_bytes=ledger.buffered_bytes,
            reserved_events=ledger.reserved_events,
            producers_waiting=ledger.waiting,
            events_sent=self._events_sent,
            bytes_sent=self._bytes_sent,
            heartbeats_sent=self._heartbeats_sent,
            last_write=self._last_write,
        )
