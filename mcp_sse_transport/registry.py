"""Sessions by id: lookup, statistics across sessions, and shutdown of them all."""

from __future__ import annotations

from collections.abc import ItemsView, Iterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import anyio

from .handler import SessionHandler, SessionStatistics

__all__ = ["RegistryStatistics", "SessionRegistry"]


class _HasHandler(Protocol):
    @property
    def handler(self) -> SessionHandler: ...


S = TypeVar("S", bound=_HasHandler)


@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    """A snapshot across every open session."""

    open_sessions: int
    buffered_events: int
    buffered_bytes: int
    producers_waiting: int
    events_sent: int
    shutting_down: bool
    sessions: tuple[SessionStatistics, ...]


class SessionRegistry(Generic[S]):
    """Open sessions keyed by session id; each entry holds its :class:`SessionHandler`."""

    def __init__(self) -> None:
        self._sessions: dict[str, S] = {}
        self._shutting_down = False

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def __iter__(self) -> Iterator[str]:
        return iter(self._sessions)

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    def refuse_new(self) -> None:
        """From now on the registry is shutting down: front ends refuse new sessions."""
        self._shutting_down = True

    def add(self, session_id: str, entry: S) -> None:
        if session_id in self._sessions:
            raise KeyError("a session with this id is already registered")
        self._sessions[session_id] = entry

    def items(self) -> ItemsView[str, S]:
        return self._sessions.items()

    def get(self, session_id: str) -> S | None:
        return self._sessions.get(session_id)

    def discard(self, session_id: str, entry: S | None = None) -> None:
        """Forget the session; given its ``entry``, only if that is still the one registered (a
        session taken over anew may have replaced it)."""
        if entry is None or self._sessions.get(session_id) is entry:
            self._sessions.pop(session_id, None)

    def statistics(self) -> RegistryStatistics:
        sessions = tuple(entry.handler.statistics() for entry in self._sessions.values())
        return RegistryStatistics(
            open_sessions=len(sessions),
            buffered_events=sum(s.buffered_events for s in sessions),
            buffered_bytes=sum(s.buffered_bytes for s in sessions),
            producers_waiting=sum(s.producers_waiting for s in sessions),
            events_sent=sum(s.events_sent for s in sessions),
            shutting_down=self._shutting_down,
            sessions=sessions,
        )

    async def shutdown(self) -> None:
        """Refuse new sessions; drain and end every open one, concurrently, each within its
        ``drain_timeout``, with the shutdown error event."""
        self.refuse_new()
        async with anyio.create_task_group() as tg:
            for entry in list(self._sessions.values()):
                tg.start_soon(entry.handler.shutdown)
