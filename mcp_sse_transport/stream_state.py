"""The state machine of one session's stream: pure, synchronous, no I/O, no clock.

Modelled on h11's ``Connection``: :class:`StreamState` holds the session's state
(:class:`SessionState`), its attached connection, the order of resumes, the buffer's
accounting (a :class:`~mcp_sse_transport.flow.CreditLedger`, passed in) and the queue of
encoded events, and each transition is a method that checks it is legal, raising
:class:`StreamStateError` if not. The anyio driver (:class:`~mcp_sse_transport.handler.SessionHandler`
and its writer, :class:`~mcp_sse_transport.writer.StreamWriter`) waits, writes and times, and
tells this object what happened. Imports no anyio, no I/O, no SDK.

States::

    OPEN --close--> CLOSING --finish_close--> CLOSED
      |                |
      +--fail/evict/expire/detach (no grace, or while closing)--> BROKEN

``close`` of a session with nothing left to deliver goes straight to CLOSED. CLOSED and BROKEN
are final: a later failure is ignored (the first ending wins).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Generic, Protocol, TypeVar

__all__ = [
    "WRITE_CHUNK",
    "Connection",
    "FailureKind",
    "Ledger",
    "SessionState",
    "SessionStatistics",
    "StreamState",
    "StreamStateError",
]

WRITE_CHUNK = 64 * 1024
"""Events ready together are joined into writes of about this many bytes: larger joins cost
more in copying than they save in sends."""


class StreamStateError(RuntimeError):
    """A transition the stream's state does not allow (a driver bug, not a client's doing)."""


class SessionState(Enum):
    OPEN = "open"
    """Granting; writing while a connection is attached, buffering while none is."""
    CLOSING = "closing"
    """No new grants; buffered events drain, then the final event, if any, is written."""
    CLOSED = "closed"
    """Ended gracefully: everything buffered was written."""
    BROKEN = "broken"
    """Ended by a failure: slow consumer, no resume within the grace period, drain deadline."""


_ENDED = (SessionState.CLOSED, SessionState.BROKEN)


class FailureKind(Enum):
    """Why a session broke; the driver maps each to the exception producers get."""

    SLOW_CONSUMER = "slow consumer"
    CONNECTION_LOST = "connection lost"
    """The connection dropped (no grace, or while draining), a drain deadline passed, or an abort."""
    EXPIRED = "expired"
    """No resume within ``session_grace``."""
    STORE_UNAVAILABLE = "store unavailable"
    MOVED = "moved"
    """Fenced: another worker serves the session now."""


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


class Ledger(Protocol):
    """What the stream needs of the buffer's :class:`~mcp_sse_transport.flow.CreditLedger`
    (a sibling in the sans-I/O core, so passed in rather than imported)."""

    @property
    def buffered_events(self) -> int: ...
    @property
    def buffered_bytes(self) -> int: ...
    @property
    def reserved_events(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    def release(self, events: int, size: int) -> None: ...
    def fail_waiting(self) -> object: ...


class Connection:
    """The state of one attached connection: ``dead`` once it is gone (nothing more is written
    to it), ``superseded`` once a resume replaces it, ``final`` the event its stream ends with
    instead of the session's."""

    __slots__ = ("dead", "final", "superseded")

    def __init__(self) -> None:
        self.dead = False
        self.superseded = False
        self.final: bytes | None = None

    @property
    def stopped(self) -> bool:
        """Nothing but a final event is written to it any more."""
        return self.dead or self.superseded

    def mark_dead(self) -> bool:
        """The connection is gone; True if it was not already."""
        if self.dead:
            return False
        self.dead = True
        return True


C = TypeVar("C", bound=Connection)


class StreamState(Generic[C]):
    """One session's stream, as a synchronous state machine over connections of type ``C``.

    ``ledger`` accounts for the buffer: events leave it as they are written, or all at once as
    the stream ends. ``deferred`` is for a store that cannot store at once (Redis): sent events wait in
    :attr:`deferred` until the driver stores them as a batch. ``last_token`` continues a log
    that already holds events (a session taken over from another worker).
    """

    __slots__ = (
        "bytes_sent",
        "claims",
        "connection",
        "connections",
        "deferred",
        "events_sent",
        "failure",
        "final",
        "heartbeats_sent",
        "last_token",
        "last_write",
        "ledger",
        "newest",
        "queue",
        "state",
    )

    def __init__(self, ledger: Ledger, *, deferred: bool, last_token: str | None = None) -> None:
        self.state = SessionState.OPEN
        self.failure: tuple[FailureKind, str] | None = None
        self.final: bytes | None = None
        """The event written after everything buffered when the session closes, if any."""
        self.ledger = ledger
        self.queue: list[tuple[bytes, int]] = []
        """Stored events ready to write: each encoded, with its payload size."""
        self.deferred: list[tuple[str | None, bytes]] | None = [] if deferred else None
        """Events sent and not yet stored (``None`` with a store that stores at once)."""
        self.last_token = last_token
        self.connection: C | None = None
        self.connections = 0
        self.claims = 0
        self.newest: tuple[int, int] | None = None
        self.events_sent = 0
        self.bytes_sent = 0
        self.heartbeats_sent = 0
        self.last_write: float | None = None

    def __repr__(self) -> str:
        return f"<StreamState {self.state.value} attached={self.connection is not None}>"

    @property
    def ended(self) -> bool:
        return self.state in _ENDED

    @property
    def lingering(self) -> bool:
        """Detached and not ended: the session waits ``session_grace`` for a resume."""
        return self.connection is None and not self.ended

    @property
    def drained(self) -> bool:
        """Detached with nothing buffered: a close has nothing left to deliver."""
        return self.connection is None and not self.queue and not self.deferred

    # -- connections -------------------------------------------------------------------------

    def claim(self, sequence: int | None = None) -> tuple[int, int]:
        """A resume's place in line: ``sequence`` (default: that of the newest claim) and, to
        break ties, the order claims were taken here. The newest claim is the one to attach."""
        self.claims += 1
        if sequence is None:
            sequence = self.newest[0] if self.newest is not None else 0
        claim = (sequence, self.claims)
        if self.newest is None or claim > self.newest:
            self.newest = claim
        return claim

    def is_latest(self, claim: tuple[int, int]) -> bool:
        """Whether no resume that arrived later claimed the session."""
        return claim == self.newest

    def attach(self, connection: C) -> C:
        """Attach ``connection``; one still attached must be superseded and detached first. An
        ended session can be attached (its run writes nothing)."""
        if self.connection is not None:
            raise StreamStateError("a connection is attached: supersede it first")
        self.connection = connection
        self.connections += 1
        return connection

    def start(self, connection: C) -> None:
        """``connection`` begins writing: it must be the attached one."""
        if connection is not self.connection:
            raise StreamStateError("this attachment was superseded or has already run")

    def supersede(self, final: bytes | None) -> C | None:
        """Mark the attached connection superseded, to end its stream with ``final`` (``None``:
        just its end); returns it (``None`` if none is attached)."""
        connection = self.connection
        if connection is not None:
            connection.superseded = True
            connection.final = final
        return connection

    def final_event(self, connection: C) -> bytes | None:
        """What ``connection``'s stream ends with: its own final event, else the session's; none
        for a connection that is gone, unless the session ended (one try at a farewell)."""
        final = connection.final if connection.final is not None else self.final
        if final is not None and (not connection.dead or self.ended):
            return final
        return None

    def graceful(self, connection: C) -> bool:
        """Whether ``connection``'s stream ended well (its terminator should be written)."""
        return self.state is SessionState.CLOSED or (connection.superseded and not connection.dead)

    def detach(self, connection: C, *, lingers: bool) -> bool:
        """``connection``'s run ended. A session closing, or open with no grace (``lingers``
        false), breaks with ``CONNECTION_LOST``; returns whether it broke."""
        if self.connection is connection:
            self.connection = None
        if self.state is SessionState.CLOSING:
            return self.fail(FailureKind.CONNECTION_LOST, "the connection dropped while draining")
        if self.state is SessionState.OPEN and not lingers:
            return self.fail(FailureKind.CONNECTION_LOST, "the connection dropped")
        return False

    # -- endings -----------------------------------------------------------------------------

    def close(self, final: bytes | None) -> bool:
        """OPEN to CLOSING: refuse new grants (waiting producers are failed) and drain, then
        write ``final``; straight to CLOSED if nothing is left to deliver. Returns whether the
        close began here (False, with nothing changed, if it already closed or ended)."""
        if self.state is not SessionState.OPEN:
            return False
        self.state = SessionState.CLOSING
        self.final = final
        self.ledger.fail_waiting()
        if self.drained:
            self._end(SessionState.CLOSED)
        # Detached with events buffered: a resume within drain_timeout still delivers them.
        return True

    def finish_close(self) -> None:
        """CLOSING to CLOSED: everything buffered, and the final event, reached the connection."""
        if self.state is not SessionState.CLOSING:
            raise StreamStateError(f"only a closing session can finish closing, this one is {self.state.value}")
        self._end(SessionState.CLOSED)

    def fail(self, kind: FailureKind, reason: str, *, final: bytes | None = None) -> bool:
        """End by a failure: the buffer is dropped, producers get ``kind``'s error, the attached
        connection is marked dead (its stream ends with ``final``, if any). Returns False, with
        nothing changed, if the session had already ended: the first ending wins."""
        if self.ended:
            return False
        self.failure = (kind, reason)
        connection = self.connection
        if connection is not None:
            connection.final = final
            connection.dead = True
        self._end(SessionState.BROKEN)
        return True

    def evict(self, reason: str, final: bytes) -> bool:
        """Cut a slow consumer loose; only an open session (a closing one grants nothing)."""
        if self.state is not SessionState.OPEN:
            return False
        return self.fail(FailureKind.SLOW_CONSUMER, f"slow consumer: {reason}", final=final)

    def expire(self, reason: str) -> None:
        """``session_grace`` passed with no connection attached: the session breaks, ``EXPIRED``."""
        if self.ended:
            raise StreamStateError(f"an ended session cannot expire, this one is {self.state.value}")
        if self.connection is not None:
            raise StreamStateError("an attached session cannot expire")
        self.fail(FailureKind.EXPIRED, reason)

    def _end(self, state: SessionState) -> None:
        self.state = state
        self.queue.clear()
        if self.deferred:
            self.deferred.clear()
        self.ledger.fail_waiting()
        self.ledger.release(self.ledger.buffered_events, self.ledger.buffered_bytes)

    # -- the buffer --------------------------------------------------------------------------

    def _check_accepting(self) -> None:
        if self.state is not SessionState.OPEN:
            raise StreamStateError(f"a {self.state.value} session takes no events")

    def defer(self, event: str | None, data: bytes) -> None:
        """Keep a granted event until the driver stores it with the rest of :attr:`deferred`."""
        if self.deferred is None:
            raise StreamStateError("this session's store stores at once: nothing is deferred")
        self._check_accepting()
        self.deferred.append((event, data))

    def take_deferred(self) -> list[tuple[str | None, bytes]]:
        """The deferred events, in order, for the driver to store as one batch."""
        batch, self.deferred = self.deferred or [], []
        return batch

    def enqueue(self, encoded: bytes, size: int, token: str) -> None:
        """A stored event (``size`` payload bytes, stored as ``token``) is ready to write."""
        if self.state in _ENDED:  # not the property: this runs once per event
            raise StreamStateError(f"a {self.state.value} session queues no events")
        self.last_token = token
        self.queue.append((encoded, size))

    def take(self, limit: int = WRITE_CHUNK) -> tuple[bytes, int, int]:
        """The events at the head of the queue, at least one, joined up to about ``limit``
        bytes; returns the chunk, its events and their payload bytes. Their room stays taken
        until :meth:`written`."""
        queue = self.queue
        if not queue:
            raise StreamStateError("nothing is queued")
        count, total = 0, 0
        for encoded, _ in queue:
            if count and total + len(encoded) > limit:
                break
            count += 1
            total += len(encoded)
        taken = queue[:count]
        del queue[:count]
        chunk = taken[0][0] if count == 1 else b"".join(item[0] for item in taken)
        return chunk, count, sum(item[1] for item in taken)

    def written(self, events: int, size: int) -> None:
        """Taken events reached the connection: their room goes back to producers (an ended
        session's buffer was already emptied)."""
        self.events_sent += events
        if not self.ended:
            self.ledger.release(events, size)

    def wrote(self, nbytes: int, now: float) -> None:
        """A write of ``nbytes`` completed at ``now``."""
        self.bytes_sent += nbytes
        self.last_write = now

    def start_replay(self) -> str | None:
        """A resume replays from the store: the queue is dropped and the room of everything
        stored given back (what a dropped connection had in flight is never released by it);
        events not yet stored keep theirs. Returns the token to replay up to (``None``: the log
        holds nothing)."""
        self.queue.clear()
        deferred = self.deferred or ()
        ledger = self.ledger
        ledger.release(
            ledger.buffered_events - len(deferred),
            ledger.buffered_bytes - sum(len(data) for _, data in deferred),
        )
        return self.last_token

    def statistics(self, tag: str) -> SessionStatistics:
        ledger = self.ledger
        return SessionStatistics(
            session=tag,
            state=self.state,
            attached=self.connection is not None,
            buffered_events=ledger.buffered_events,
            buffered_bytes=ledger.buffered_bytes,
            reserved_events=ledger.reserved_events,
            producers_waiting=ledger.waiting,
            events_sent=self.events_sent,
            bytes_sent=self.bytes_sent,
            heartbeats_sent=self.heartbeats_sent,
            connections=self.connections,
            last_write=self.last_write,
        )
