"""The replay log: every event of a session, kept for resumption, behind a store protocol.

An :class:`EventStore` is scoped by session: ``replay`` for one session can never return another
session's events. Events are appended before they are written, so an id a client saw can be
resumed while it is retained.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Protocol, runtime_checkable

import anyio

from .errors import StoreError
from .ids import session_tag

__all__ = [
    "BEFORE_FIRST",
    "EventStore",
    "InMemoryEventStore",
    "Replay",
    "StoredEvent",
    "Unstored",
    "append_riding_out",
]

logger = logging.getLogger("mcp_sse_transport")

BEFORE_FIRST = "0"
"""The token that stands before a session's first event: replaying after it replays everything."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    token: str
    """The store's id of the event within its session (the part of the event id after the session)."""
    event: str | None
    data: bytes


@dataclass(frozen=True, slots=True)
class Replay:
    events: list[StoredEvent]
    """The retained events after the requested one, oldest first."""
    gap: bool
    """Events after the requested one were trimmed before they could be replayed."""


@runtime_checkable
class EventStore(Protocol):
    """Where a session's events are kept for replay.

    ``append`` must return ids in call order for a session (compare equal order to the order of
    the calls), and the tokens must not contain line breaks or NUL.

    Two optional methods change how a :class:`~mcp_sse_transport.handler.SessionHandler` uses
    a store: ``append_nowait(session_id, event, data) -> str``, synchronous, stores each event
    as it is sent (the in-memory store); without it, sends do not wait for the store, and the
    writer stores what is waiting before writing it, in one ``append_many(session_id, [(event,
    data), ...]) -> [token, ...]`` call if the store has it (Redis), else one ``append`` each.
    """

    async def append(self, session_id: str, event: str | None, data: bytes) -> str:
        """Keep one event; returns its token. Applies the store's retention limits."""
        ...

    async def replay(
        self, session_id: str, after: str, until: str | None = None, *, limit: int | None = None
    ) -> Replay | None:
        """Events after ``after`` up to and including ``until`` (``None``: the newest), at most
        ``limit`` of them (the oldest first; ``None``: all), so a replay can be read in pieces.

        ``None`` when the session is unknown or expired, or ``after`` is neither a token this
        store issued for it nor :data:`BEFORE_FIRST`.
        """
        ...

    async def trim(self, session_id: str) -> None:
        """Apply the retention limits now (age, mostly: appends apply them too)."""
        ...

    async def drop(self, session_id: str) -> None:
        """Forget a session and its events."""
        ...


class _Log:
    __slots__ = ("bytes", "entries", "next_seq")

    def __init__(self) -> None:
        self.entries: deque[tuple[int, float, str | None, bytes]] = deque()
        self.next_seq = 1
        self.bytes = 0


class InMemoryEventStore:
    """The process-local store: per session, a log bounded by events, bytes and age.

    Tokens are decimal sequence numbers from 1. The defaults are ``SseConfig``'s: twice the
    session buffer (2,000 events, 8 MiB), so events written to a connection that then dropped can
    still be replayed; ``max_age`` (5 minutes) drops what no reconnect could still want.
    """

    def __init__(
        self,
        *,
        max_events: int = 2000,
        max_bytes: int = 8 * 1024 * 1024,
        max_age: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_events < 1 or max_bytes < 1 or max_age <= 0:
            raise ValueError("max_events, max_bytes and max_age must be positive")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._clock = clock
        self._logs: dict[str, _Log] = {}

    def __len__(self) -> int:
        return len(self._logs)

    def _trim(self, log: _Log, now: float) -> None:
        entries = log.entries
        while entries and (
            len(entries) > self.max_events or log.bytes > self.max_bytes or now - entries[0][1] > self.max_age
        ):
            log.bytes -= len(entries.popleft()[3])

    async def append(self, session_id: str, event: str | None, data: bytes) -> str:
        return self.append_nowait(session_id, event, data)

    def append_nowait(self, session_id: str, event: str | None, data: bytes) -> str:
        """``append`` without a coroutine: a memory store never waits, and the session handler's
        fast path takes this when a store offers it."""
        log = self._logs.get(session_id)
        if log is None:
            log = self._logs[session_id] = _Log()
        seq = log.next_seq
        log.next_seq += 1
        now = self._clock()
        log.entries.append((seq, now, event, data))
        log.bytes += len(data)
        self._trim(log, now)
        return str(seq)

    async def replay(
        self, session_id: str, after: str, until: str | None = None, *, limit: int | None = None
    ) -> Replay | None:
        log = self._logs.get(session_id)
        if log is None and after == BEFORE_FIRST:
            return Replay([], gap=False)
        if log is None or not _is_token(after) or (until is not None and not _is_token(until)):
            return None
        after_seq = int(after)
        last = log.next_seq - 1
        until_seq = last if until is None else int(until)
        if after_seq > last:
            return None
        self._trim(log, self._clock())
        first = log.entries[0][0] if log.entries else log.next_seq
        start, stop = max(0, after_seq + 1 - first), max(0, until_seq + 1 - first)
        if limit is not None:
            stop = min(stop, start + limit)
        events = [StoredEvent(str(seq), event, data) for seq, _, event, data in islice(log.entries, start, stop)]
        return Replay(events, gap=after_seq + 1 < first)

    async def trim(self, session_id: str) -> None:
        log = self._logs.get(session_id)
        if log is not None:
            self._trim(log, self._clock())

    async def drop(self, session_id: str) -> None:
        self._logs.pop(session_id, None)


class Unstored:
    """A store that keeps nothing, for a stream no client can resume (a 2026-07-28 response
    stream: a broken one loses its request). Tokens count up; every replay is refused."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = 0

    def append_nowait(self, session_id: str, event: str | None, data: bytes) -> str:
        self._last += 1
        return str(self._last)

    async def append(self, session_id: str, event: str | None, data: bytes) -> str:
        return self.append_nowait(session_id, event, data)

    async def replay(
        self, session_id: str, after: str, until: str | None = None, *, limit: int | None = None
    ) -> Replay | None:
        return None

    async def trim(self, session_id: str) -> None:
        pass

    async def drop(self, session_id: str) -> None:
        pass


async def _append_all(store: EventStore, session_id: str, batch: Sequence[tuple[str | None, bytes]]) -> list[str]:
    append_many = getattr(store, "append_many", None)
    if append_many is not None:
        return list(await append_many(session_id, batch))
    return [await store.append(session_id, event, data) for event, data in batch]


def _permanent(message: str) -> StoreError:
    """A store failure that trying again cannot mend."""
    error = StoreError(message)
    error.transient = False
    return error


async def append_riding_out(
    store: EventStore,
    session_id: str,
    batch: Sequence[tuple[str | None, bytes]],
    *,
    after: str | None,
    within: float,
) -> list[str]:
    """Append ``batch`` in order and return its tokens, trying again on transient failures for up
    to ``within`` seconds: a slow or briefly unreachable store is backpressure, not death (the
    events wait in the caller's bounded buffer meanwhile).

    A failed call may have stored some of the batch (its reply lost): before trying again, the
    events stored after ``after`` (the session's newest token before the batch, ``None`` before
    any) are read back, and only the rest is appended again, so nothing is stored twice. That
    relies on the session having one writer, which the owner's lease (fenced in Redis)
    guarantees. Raises the last :class:`StoreError` once ``within`` has passed, or at once for
    one that is not ``transient``.
    """
    deadline = anyio.current_time() + within
    tokens: list[str] = []
    pending = list(batch)
    delay = 0.05
    failed: StoreError | None = None
    while True:
        try:
            if failed is not None:  # what of the batch arrived before the failure
                stored = await store.replay(session_id, after or BEFORE_FIRST, limit=len(pending) + 1)
                if stored is None:  # no retry brings it back
                    raise _permanent(f"the log of session {session_tag(session_id)} is gone") from failed
                arrived = [(event.event, event.data) for event in stored.events]
                if len(arrived) > len(pending) or arrived != pending[: len(arrived)]:
                    tag = session_tag(session_id)
                    raise _permanent(f"the log of session {tag} holds events it did not append") from failed
                tokens += [event.token for event in stored.events]
                after = stored.events[-1].token if stored.events else after
                pending = pending[len(arrived) :]
                logger.info("session %s: the event store answers again", session_tag(session_id))
                failed = None
            tokens += await _append_all(store, session_id, pending)
            return tokens
        except StoreError as exc:
            if not exc.transient or anyio.current_time() + delay > deadline:
                raise
            if failed is None:
                logger.warning("session %s: the event store failed (%s); trying again", session_tag(session_id), exc)
            failed = exc
        await anyio.sleep(delay)  # a retry's backoff: nothing to wait on but the clock
        delay = min(delay * 2, 1.0)


def _is_token(token: str) -> bool:
    """A token this store issues: ASCII digits (``str.isdigit`` takes superscripts and other scripts' digits)."""
    return token.isascii() and token.isdigit() and len(token) <= 20
