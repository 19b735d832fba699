"""Writing one session's stream to a connection: the replay of its stored events, then live ones.

:class:`StreamWriter` is the writer half of :class:`~mcp_sse_transport.handler.SessionHandler`: it
attaches a connection, replays, writes queued events and heartbeats under write deadlines, stores
events deferred for a batch, and turns what happens into transitions of the
:class:`~mcp_sse_transport.stream_state.StreamState`. The producer half is the handler's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

from .config import SseConfig
from .errors import ErrorCode, FencedError, StoreError
from .events import HEARTBEAT, encode_error
from .ids import session_tag
from .replay import encode_stored, replay_chunks
from .store import EventStore, append_riding_out
from .stream_state import Connection, FailureKind, SessionState, StreamState

__all__ = ["Attachment", "Closed", "Sink", "StreamWriter"]

logger = logging.getLogger("mcp_sse_transport")

Sink = Callable[[bytes], Awaitable[None]]
"""Where a handler writes: called with one or more whole events at a time."""
Closed = Callable[[], Awaitable[object]]
"""Returns once the connection's peer has gone; awaited, and cancelled, while the stream is idle."""


class Attachment(Connection):
    """One connection of a session, from :meth:`StreamWriter.attach` until its ``run`` ends."""

    __slots__ = ("_writer", "write_scope")

    def __init__(self, writer: StreamWriter) -> None:
        super().__init__()
        self._writer = writer
        self.write_scope: anyio.CancelScope | None = None

    def lost(self) -> None:
        """This connection is gone (the client disconnected): stop writing to it at once."""
        if self.mark_dead():
            logger.info("session %s: the client disconnected", self._writer.tag)
            self._writer._wake_writer(self)


class StreamWriter:
    """The writer of one session's stream: :meth:`attach` a connection, then :meth:`run` it."""

    __slots__ = (
        "_changed",
        "_id_prefix",
        "_idle_scope",
        "_last_activity",
        "_store",
        "_storing",
        "_stream",
        "config",
        "epilogue",
        "guard",
        "session_id",
    )

    def __init__(
        self, session_id: str, config: SseConfig, store: EventStore, stream: StreamState[Attachment], id_prefix: bytes
    ) -> None:
        self.session_id = session_id
        self.config = config
        self._store = store
        self._stream = stream
        self._id_prefix = id_prefix
        self._storing: anyio.Lock | None = None
        self._idle_scope: anyio.CancelScope | None = None
        """The writer's wait while idle: producers cancel it to wake the writer."""
        self._changed: anyio.Event | None = None
        """Created when first waited on: an idle session should cost little."""
        self._last_activity = 0.0
        self.epilogue: bytes | None = None
        """Written after the final event of a stream that broke: a front end's answer to whoever
        waits on the stream (a request whose response stream was cut loose)."""
        self.guard: Callable[[], Awaitable[None]] | None = None
        """Awaited before each write of events to a connection (not of heartbeats): returns once
        this worker may write them, raises once it may not (with Redis: its lease is lost)."""

    @property
    def tag(self) -> str:
        return session_tag(self.session_id)

    @property
    def ended(self) -> bool:
        return self._stream.ended

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

    def _wake_writer(self, connection: Attachment) -> None:
        self._wake()
        if connection.write_scope is not None and connection.stopped:
            connection.write_scope.cancel()

    def _fail(self, kind: FailureKind, reason: str, *, final: bytes | None = None) -> None:
        """End the session by a failure: every producer gets ``kind``'s error, the buffer is dropped."""
        if self._stream.fail(kind, reason, final=final):
            self._failed()

    def _failed(self) -> None:
        """The stream just broke: log why, stop its writer, wake whoever waits for the end."""
        assert self._stream.failure is not None
        kind, reason = self._stream.failure
        if kind is not FailureKind.SLOW_CONSUMER:
            logger.info("session %s ended: %s", self.tag, reason)
        if self._stream.connection is not None:
            self._wake_writer(self._stream.connection)
        self._notify_change()

    # -- storing -----------------------------------------------------------------------------

    async def _store_deferred(self) -> bool:
        """Store the deferred events in one call, in order, and queue them for writing; False if
        the session ended (the store failed, or something else ended it meanwhile)."""
        if self._storing is None:
            self._storing = anyio.Lock()
        async with self._storing:  # also waits for a batch another task is storing
            batch = self._stream.take_deferred()
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
                            after=self._stream.last_token,
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
        self._fail(FailureKind.MOVED, "another worker serves the session now")

    def _store_failed(self, exc: StoreError) -> None:
        logger.error("session %s: the event store failed (%s); the session ends", self.tag, exc)
        final = encode_error(ErrorCode.STORE_UNAVAILABLE, "Session store unavailable; the session ends")
        self._fail(FailureKind.STORE_UNAVAILABLE, "the event store failed", final=final)

    def _enqueue(self, data: bytes, event: str | None, token: str) -> None:
        self._stream.enqueue(encode_stored(data, event, self._id_prefix, token), len(data), token)
        self._wake()

    # -- writing -----------------------------------------------------------------------------

    def attach(self) -> Attachment:
        """Claim the session for a new connection; ``run`` it next. A connection still attached
        must be superseded first (:class:`~mcp_sse_transport.stream_state.StreamStateError`, a
        :class:`RuntimeError`, if not)."""
        connection = self._stream.attach(Attachment(self))
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
        stream = self._stream
        connection = attachment if attachment is not None else self.attach()
        stream.start(connection)
        self._last_activity = anyio.current_time()
        try:
            if stream.ended:
                return False
            if (not preface or await self._write(sink, connection, preface)) and (
                after is None or await self._replay(sink, connection, after)
            ):
                await self._pump(sink, connection, closed)
            final = stream.final_event(connection)
            if final is not None and stream.failure is not None and self.epilogue is not None:
                final += self.epilogue
            if final is not None:
                # After a failure the client is likely stuck: one short, bounded try.
                timeout = min(self.config.write_timeout, self.config.drain_timeout)
                await self._write(sink, connection, final, force=True, within=timeout)
            if stream.state is SessionState.CLOSING and not connection.dead:
                stream.finish_close()
                self._notify_change()
                logger.debug("session %s closed", self.tag)
            return stream.graceful(connection)
        finally:
            if stream.detach(connection, lingers=self.config.session_grace != 0):
                self._failed()
            self._notify_change()

    async def _replay(self, sink: Sink, connection: Attachment, after: str) -> bool:
        """Re-send, from the store, every event after ``after`` up to the newest: buffered events
        included, which is why the buffer is emptied first. Events produced meanwhile queue up."""
        if self._stream.deferred is not None and not await self._store_deferred():
            return False
        cut = self._stream.start_replay()
        if cut is None:
            return True
        try:
            async for chunk, events, _ in replay_chunks(
                self._store, self.session_id, self._id_prefix.decode(), after, cut
            ):
                if not await self._write(sink, connection, chunk):
                    return False
                self._stream.events_sent += events
        except StoreError as exc:
            logger.warning("session %s: could not replay (%s); dropping the connection", self.tag, exc)
            return False
        return True

    async def _pump(self, sink: Sink, connection: Attachment, closed: Closed | None) -> None:
        """Write buffered events, or a heartbeat when idle, until this connection stops. While
        idle the writer awaits ``closed`` itself: one task serves the connection both ways."""
        stream = self._stream
        while not connection.stopped:
            if stream.deferred:
                if not await self._store_deferred():
                    return
                continue
            if stream.queue:
                chunk, events, size = stream.take()
                if not await self._write(sink, connection, chunk):
                    return
                stream.written(events, size)
                continue
            if stream.state is not SessionState.OPEN:
                return
            idle = self.config.heartbeat_interval - (anyio.current_time() - self._last_activity)
            if idle <= 0:
                if not await self._write(sink, connection, HEARTBEAT):
                    return
                stream.heartbeats_sent += 1
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

    async def _write(
        self, sink: Sink, connection: Attachment, chunk: bytes, *, force: bool = False, within: float | None = None
    ) -> bool:
        """One write under ``write_timeout``; False, with the connection marked dead, if it fails.
        ``force`` writes a final event to a connection that is ending."""
        if connection.stopped and not force:
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
            if not connection.stopped:
                logger.info("session %s: a write stalled for %g s", self.tag, self.config.write_timeout)
            connection.dead = True
            return False
        self._last_activity = anyio.current_time()
        self._stream.wrote(len(chunk), self._last_activity)
        return True
