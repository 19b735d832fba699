"""Request/grant flow control: a synchronous ledger of a session's buffer, in events and bytes.

A producer asks for room (``request``), is granted it now or queued in FIFO order, and spends the
grant on exactly one event (``commit``). The writer gives room back as events leave (``release``),
which grants queued requests in order. No I/O, no clock: the session handler wraps it with anyio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum

from .errors import GrantError

__all__ = ["CreditLedger", "Grant", "GrantState"]

_NO_WAITERS: deque[Grant] = deque(maxlen=0)
"""Shared by every ledger nobody waits on (most of them): an empty deque costs half a KiB."""


class GrantState(Enum):
    WAITING = "waiting"
    GRANTED = "granted"
    SPENT = "spent"
    WITHDRAWN = "withdrawn"
    FAILED = "failed"


class Grant:
    """Permission to put one event of at most ``size`` payload bytes into a session's buffer."""

    __slots__ = ("_ledger", "on_grant", "size", "state")

    def __init__(self, ledger: CreditLedger, size: int, on_grant: Callable[[], object] | None) -> None:
        self._ledger = ledger
        self.on_grant = on_grant
        """Called when a waiting grant is granted or failed, to wake its producer."""
        self.size = size
        self.state = GrantState.WAITING

    def __repr__(self) -> str:
        return f"<Grant size={self.size} {self.state.value}>"

    @property
    def granted(self) -> bool:
        """Whether the grant may be spent now."""
        return self.state is GrantState.GRANTED


class CreditLedger:
    """Counts what a session's buffer holds and what producers have been promised.

    The buffer is full when one more event would exceed ``max_events``, or its bytes would exceed
    ``max_bytes``, counting committed and reserved room alike. An event larger than ``max_bytes``
    is granted once the buffer is empty, so it waits instead of failing forever.
    """

    __slots__ = (
        "_waiting",
        "buffered_bytes",
        "buffered_events",
        "max_bytes",
        "max_events",
        "reserved_bytes",
        "reserved_events",
    )

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.buffered_events = 0
        self.buffered_bytes = 0
        self.reserved_events = 0
        self.reserved_bytes = 0
        self._waiting: deque[Grant] = _NO_WAITERS  # a deque of its own once someone waits

    @property
    def waiting(self) -> int:
        """Producers queued for a grant."""
        return len(self._waiting)

    def _fits(self, size: int) -> bool:
        events = self.buffered_events + self.reserved_events
        if events >= self.max_events:
            return False
        return events == 0 or self.buffered_bytes + self.reserved_bytes + size <= self.max_bytes

    def _grant(self, grant: Grant) -> None:
        grant.state = GrantState.GRANTED
        self.reserved_events += 1
        self.reserved_bytes += grant.size
        if grant.on_grant is not None:
            grant.on_grant()

    def _pump(self) -> None:
        while self._waiting and self._fits(self._waiting[0].size):
            self._grant(self._waiting.popleft())

    def request(self, size: int, on_grant: Callable[[], object] | None = None) -> Grant:
        """Ask for room for one event; the grant is ``GRANTED`` now or ``WAITING`` in line.

        ``on_grant`` is called (synchronously) when the request is granted or failed, so a waiting
        producer can be woken; it may be called before ``request`` returns.
        """
        if size < 0:
            raise ValueError(f"event size must be >= 0, got {size}")
        grant = Grant(self, size, on_grant)
        if not self._waiting and self._fits(size):
            self._grant(grant)
        else:
            if self._waiting is _NO_WAITERS:
                self._waiting = deque()
            self._waiting.append(grant)
        return grant

    def take(self, size: int) -> bool:
        """Buffer one event of ``size`` bytes now if there is room and nobody is in line: a
        producer's request, grant and commit in one step, when it would not have to wait."""
        if self._waiting or not self._fits(size):
            return False
        self.buffered_events += 1
        self.buffered_bytes += size
        return True

    def withdraw(self, grant: Grant) -> None:
        """Give up a grant that was not spent (a cancelled or timed-out producer)."""
        if grant._ledger is not self:
            raise GrantError("this grant belongs to another session")
        if grant.state is GrantState.WAITING:
            self._waiting.remove(grant)
            grant.state = GrantState.WITHDRAWN
            self._pump()
        elif grant.state is GrantState.GRANTED:
            grant.state = GrantState.WITHDRAWN
            self.reserved_events -= 1
            self.reserved_bytes -= grant.size
            self._pump()

    def commit(self, grant: Grant, size: int) -> None:
        """Spend ``grant`` on one event of ``size`` bytes, which is now buffered."""
        if grant._ledger is not self:
            raise GrantError("this grant belongs to another session")
        if grant.state is not GrantState.GRANTED:
            raise GrantError(f"an event needs a granted grant, this one is {grant.state.value}")
        if size > grant.size:
            raise GrantError(f"event of {size} bytes exceeds its grant of {grant.size} bytes")
        grant.state = GrantState.SPENT
        self.reserved_events -= 1
        self.reserved_bytes -= grant.size
        self.buffered_events += 1
        self.buffered_bytes += size
        self._pump()

    def release(self, events: int, size: int) -> None:
        """Events left the buffer: their room goes to producers in line."""
        if events > self.buffered_events or size > self.buffered_bytes:
            raise ValueError("released more than is buffered")
        self.buffered_events -= events
        self.buffered_bytes -= size
        self._pump()

    def fail_waiting(self) -> list[Grant]:
        """Refuse every queued request (the session is ending) and wake each one's producer."""
        failed = list(self._waiting)
        self._waiting = _NO_WAITERS
        for grant in failed:
            grant.state = GrantState.FAILED
            if grant.on_grant is not None:
                grant.on_grant()
        return failed
