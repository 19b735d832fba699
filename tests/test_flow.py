"""CreditLedger: request/grant accounting in events and bytes, FIFO granting, spending and giving back."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mcp_sse_transport import CreditLedger, Grant, GrantError, GrantState


def test_grants_up_to_max_events_then_queues() -> None:
    ledger = CreditLedger(max_events=3, max_bytes=1000)
    grants = [ledger.request(10) for _ in range(5)]
    assert [g.state for g in grants] == [GrantState.GRANTED] * 3 + [GrantState.WAITING] * 2
    assert [g.granted for g in grants] == [True, True, True, False, False]
    assert ledger.reserved_events == 3
    assert ledger.reserved_bytes == 30
    assert ledger.waiting == 2
    assert ledger.buffered_events == 0


def test_committed_events_count_against_the_limit() -> None:
    ledger = CreditLedger(max_events=2, max_bytes=1000)
    first = ledger.request(10)
    ledger.commit(first, 7)
    assert (ledger.buffered_events, ledger.buffered_bytes, ledger.reserved_events, ledger.reserved_bytes) == (
        1,
        7,
        0,
        0,
    )
    second = ledger.request(10)
    third = ledger.request(1)
    assert second.granted
    assert third.state is GrantState.WAITING


def test_fifo_small_request_waits_behind_big_one() -> None:
    ledger = CreditLedger(max_events=10, max_bytes=100)
    first = ledger.request(60)
    ledger.commit(first, 60)
    big = ledger.request(50)  # 60 + 50 > 100: waits
    small = ledger.request(10)  # would fit, but is behind big
    assert big.state is GrantState.WAITING
    assert small.state is GrantState.WAITING
    assert ledger.waiting == 2
    ledger.release(1, 60)
    assert big.granted
    assert small.granted


def test_release_grants_in_order_and_stops_at_first_that_does_not_fit() -> None:
    ledger = CreditLedger(max_events=10, max_bytes=100)
    first = ledger.request(100)
    ledger.commit(first, 100)
    order: list[str] = []
    a = ledger.request(40, lambda: order.append("a"))
    b = ledger.request(50, lambda: order.append("b"))
    c = ledger.request(20, lambda: order.append("c"))
    d = ledger.request(1, lambda: order.append("d"))
    assert order == []
    ledger.release(1, 100)
    # a (40) and b (50) fit; c (20) would make 110 and stops the line, d waits behind it.
    assert order == ["a", "b"]
    assert (a.state, b.state, c.state, d.state) == (
        GrantState.GRANTED,
        GrantState.GRANTED,
        GrantState.WAITING,
        GrantState.WAITING,
    )
    ledger.commit(a, 40)
    ledger.release(1, 40)
    assert order == ["a", "b", "c", "d"]


def test_bytes_limit() -> None:
    ledger = CreditLedger(max_events=100, max_bytes=10)
    a = ledger.request(4)
    b = ledger.request(6)  # exactly at the limit
    c = ledger.request(1)
    assert a.granted
    assert b.granted
    assert c.state is GrantState.WAITING
    assert ledger.reserved_bytes == 10


def test_zero_size_event_still_needs_an_event_slot() -> None:
    ledger = CreditLedger(max_events=1, max_bytes=10)
    assert ledger.request(0).granted
    assert ledger.request(0).state is GrantState.WAITING


def test_negative_size_rejected() -> None:
    ledger = CreditLedger(max_events=1, max_bytes=10)
    with pytest.raises(ValueError, match="size"):
        ledger.request(-1)


def test_oversized_event_granted_only_when_empty() -> None:
    ledger = CreditLedger(max_events=10, max_bytes=10)
    small = ledger.request(1)
    huge = ledger.request(50)
    assert small.granted
    assert huge.state is GrantState.WAITING  # not empty: waits
    ledger.commit(small, 1)
    assert huge.state is GrantState.WAITING
    ledger.release(1, 1)
    assert huge.granted  # empty now: granted although it exceeds max_bytes
    assert ledger.reserved_bytes == 50
    after = ledger.request(0)
    assert after.state is GrantState.WAITING  # nothing else while over the limit
    ledger.commit(huge, 50)
    ledger.release(1, 50)
    assert after.granted


def test_oversized_event_granted_at_once_on_empty_ledger() -> None:
    ledger = CreditLedger(max_events=1, max_bytes=10)
    grant = ledger.request(11)
    assert grant.granted
    ledger.commit(grant, 11)
    assert ledger.buffered_bytes == 11


def test_withdraw_waiting_grant_repumps() -> None:
    ledger = CreditLedger(max_events=10, max_bytes=100)
    first = ledger.request(60)
    big = ledger.request(50)
    small = ledger.request(10)
    assert small.state is GrantState.WAITING
    ledger.withdraw(big)
    assert big.state is GrantState.WITHDRAWN
    assert small.granted  # the line moved without any release
    assert ledger.waiting == 0
    assert ledger.reserved_bytes == 70
    assert first.granted


def test_withdraw_granted_grant_returns_its_room() -> None:
    ledger = CreditLedger(max_events=1, max_bytes=100)
    first = ledger.request(10)
    woken: list[str] = []
    second = ledger.request(10, lambda: woken.append("second"))
    assert second.state is GrantState.WAITING
    ledger.withdraw(first)
    assert first.state is GrantState.WITHDRAWN
    assert second.granted
    assert woken == ["second"]
    assert ledger.reserved_events == 1
    assert ledger.reserved_bytes == 10


def test_withdraw_spent_or_withdrawn_is_a_no_op() -> None:
    ledger = CreditLedger(max_events=2, max_bytes=100)
    spent = ledger.request(10)
    ledger.commit(spent, 10)
    withdrawn = ledger.request(10)
    ledger.withdraw(withdrawn)
    before = (ledger.buffered_events, ledger.buffered_bytes, ledger.reserved_events, ledger.reserved_bytes)
    ledger.withdraw(spent)
    ledger.withdraw(withdrawn)
    assert spent.state is GrantState.SPENT
    assert withdrawn.state is GrantState.WITHDRAWN
    assert (ledger.buffered_events, ledger.buffered_bytes, ledger.reserved_events, ledger.reserved_bytes) == before


def test_commit_moves_reservation_to_buffer() -> None:
    ledger = CreditLedger(max_events=5, max_bytes=100)
    grant = ledger.request(30)
    ledger.commit(grant, 20)  # smaller than granted is fine
    assert grant.state is GrantState.SPENT
    assert not grant.granted
    assert (ledger.buffered_events, ledger.buffered_bytes, ledger.reserved_events, ledger.reserved_bytes) == (
        1,
        20,
        0,
        0,
    )


def test_commit_rejects_spent_grant() -> None:
    ledger = CreditLedger(max_events=5, max_bytes=100)
    grant = ledger.request(10)
    ledger.commit(grant, 10)
    with pytest.raises(GrantError, match="spent"):
        ledger.commit(grant, 10)
    assert ledger.buffered_events == 1


def test_commit_rejects_withdrawn_grant() -> None:
    ledger = CreditLedger(max_events=5, max_bytes=100)
    grant = ledger.request(10)
    ledger.withdraw(grant)
    with pytest.raises(GrantError, match="withdrawn"):
        ledger.commit(grant, 10)
    assert ledger.buffered_events == 0


def test_commit_rejects_waiting_grant() -> None:
    ledger = CreditLedger(max_events=1, max_bytes=100)
    ledger.request(10)
    waiting = ledger.request(10)
    with pytest.raises(GrantError, match="waiting"):
        ledger.commit(waiting, 10)
    assert ledger.buffered_events == 0
    assert ledger.waiting == 1


def test_commit_rejects_foreign_grant() -> None:
    ours = CreditLedger(max_events=5, max_bytes=100)
    theirs = CreditLedger(max_events=5, max_bytes=100)
    grant = theirs.request(10)
    with pytest.raises(GrantError, match="another session"):
        ours.commit(grant, 10)
    assert grant.granted  # still theirs to spend
    assert (ours.buffered_events, ours.reserved_events) == (0, 0)


def test_withdraw_leaves_foreign_grant_alone() -> None:
    """A ledger only gives back room it handed out: another ledger's grant is refused or ignored,
    never counted against this one nor taken from its owner."""
    ours = CreditLedger(max_events=5, max_bytes=100)
    theirs = CreditLedger(max_events=5, max_bytes=100)
    grant = theirs.request(10)
    with contextlib.suppress(GrantError):
        ours.withdraw(grant)
    assert (ours.reserved_events, ours.reserved_bytes) == (0, 0)
    assert grant.granted
    theirs.commit(grant, 10)
    assert (theirs.buffered_events, theirs.reserved_events) == (1, 0)


def test_commit_rejects_grant_too_small() -> None:
    ledger = CreditLedger(max_events=5, max_bytes=100)
    grant = ledger.request(10)
    with pytest.raises(GrantError, match="exceeds"):
        ledger.commit(grant, 11)
    assert grant.granted
    assert ledger.buffered_events == 0


def test_release_more_than_buffered_rejected() -> None:
    ledger = CreditLedger(max_events=5, max_bytes=100)
    grant = ledger.request(10)
    ledger.commit(grant, 10)
    with pytest.raises(ValueError, match="released more"):
        ledger.release(2, 10)
    with pytest.raises(ValueError, match="released more"):
        ledger.release(1, 11)
    assert (ledger.buffered_events, ledger.buffered_bytes) == (1, 10)


def test_on_grant_called_synchronously_for_immediate_grant() -> None:
    ledger = CreditLedger(max_events=1, max_bytes=100)
    called: list[int] = []
    grant = ledger.request(1, lambda: called.append(1))
    assert grant.granted
    assert called == [1]


def test_fail_waiting_wakes_and_marks_failed() -> None:
    ledger = CreditLedger(max_events=1, max_bytes=100)
    granted = ledger.request(10)
    woken: list[str] = []
    a = ledger.request(10, lambda: woken.append("a"))
    b = ledger.request(10, lambda: woken.append("b"))
    failed = ledger.fail_waiting()
    assert failed == [a, b]
    assert woken == ["a", "b"]
    assert a.state is GrantState.FAILED
    assert b.state is GrantState.FAILED
    assert granted.granted  # granted grants are not touched
    assert ledger.waiting == 0
    ledger.withdraw(granted)
    assert ledger.reserved_events == 0
    assert not a.granted  # a failed request is never granted later
    with pytest.raises(GrantError, match="failed"):
        ledger.commit(a, 1)


def test_grant_repr() -> None:
    ledger = CreditLedger(max_events=1, max_bytes=100)
    assert repr(ledger.request(7)) == "<Grant size=7 granted>"


# -- property: random sequences keep the bounds and the FIFO order -----------------------------


class LedgerMachine(RuleBasedStateMachine):
    """Drives a ledger with random requests, commits, releases, withdrawals and failures.

    Keeps its own record of every grant in request order and of the events in the buffer, and
    checks after every step that the ledger's counters match, that the limits hold (but for one
    oversized event on an otherwise empty buffer), that grants happen in request order, and that
    no request waits while the one at the head of the line would fit.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ledger = CreditLedger(max_events=3, max_bytes=20)
        self.requests: list[Grant] = []  # every grant, in request order
        self.buffer: list[int] = []  # sizes of committed, unreleased events, oldest first
        self.granted_order: list[int] = []  # request indices, in the order they were granted

    def _on_grant(self, index: int) -> None:
        grant = self.requests[index] if index < len(self.requests) else None
        # ``on_grant`` may run before ``request`` returns, when we do not yet hold the grant.
        if grant is None or grant.state is GrantState.GRANTED:
            self.granted_order.append(index)

    def _with(self, state: GrantState) -> list[Grant]:
        return [g for g in self.requests if g.state is state]

    @rule(size=st.integers(min_value=0, max_value=30))
    def request(self, size: int) -> None:
        index = len(self.requests)
        grant = self.ledger.request(size, lambda: self._on_grant(index))
        self.requests.append(grant)

    @precondition(lambda self: any(g.state is GrantState.GRANTED for g in self.requests))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        grant = data.draw(st.sampled_from(self._with(GrantState.GRANTED)))
        size = data.draw(st.integers(min_value=0, max_value=grant.size))
        self.ledger.commit(grant, size)
        self.buffer.append(size)

    @precondition(lambda self: bool(self.buffer))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        count = data.draw(st.integers(min_value=1, max_value=len(self.buffer)))
        released, self.buffer = self.buffer[:count], self.buffer[count:]
        self.ledger.release(count, sum(released))

    @precondition(lambda self: any(g.state in (GrantState.GRANTED, GrantState.WAITING) for g in self.requests))
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        live = [g for g in self.requests if g.state in (GrantState.GRANTED, GrantState.WAITING)]
        grant = data.draw(st.sampled_from(live))
        self.ledger.withdraw(grant)
        assert grant.state is GrantState.WITHDRAWN

    @rule()
    def fail_waiting(self) -> None:
        waiting = self._with(GrantState.WAITING)
        assert self.ledger.fail_waiting() == waiting
        assert all(g.state is GrantState.FAILED for g in waiting)

    @rule(data=st.data())
    def commit_invalid(self, data: st.DataObject) -> None:
        invalid = [g for g in self.requests if g.state is not GrantState.GRANTED]
        if not invalid:
            return
        grant = data.draw(st.sampled_from(invalid))
        state = grant.state
        with pytest.raises(GrantError):
            self.ledger.commit(grant, 0)
        assert grant.state is state

    @invariant()
    def counters_match_model(self) -> None:
        granted = self._with(GrantState.GRANTED)
        assert self.ledger.buffered_events == len(self.buffer)
        assert self.ledger.buffered_bytes == sum(self.buffer)
        assert self.ledger.reserved_events == len(granted)
        assert self.ledger.reserved_bytes == sum(g.size for g in granted)
        assert self.ledger.waiting == len(self._with(GrantState.WAITING))

    @invariant()
    def bounds_hold(self) -> None:
        ledger = self.ledger
        events = ledger.buffered_events + ledger.reserved_events
        size = ledger.buffered_bytes + ledger.reserved_bytes
        assert events <= ledger.max_events
        if size > ledger.max_bytes:
            # Only the documented exception: a single event larger than the limit, alone.
            assert events == 1

    @invariant()
    def granted_in_request_order(self) -> None:
        assert self.granted_order == sorted(self.granted_order)
        assert len(set(self.granted_order)) == len(self.granted_order)
        # A waiting request has nothing requested after it granted.
        waiting = [i for i, g in enumerate(self.requests) if g.state is GrantState.WAITING]
        if waiting:
            assert all(i < waiting[0] for i in self.granted_order)

    @invariant()
    def head_of_line_does_not_fit(self) -> None:
        waiting = self._with(GrantState.WAITING)
        if not waiting:
            return
        ledger = self.ledger
        events = ledger.buffered_events + ledger.reserved_events
        size = ledger.buffered_bytes + ledger.reserved_bytes
        assert events >= ledger.max_events or (events > 0 and size + waiting[0].size > ledger.max_bytes)


LedgerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestLedgerMachine = LedgerMachine.TestCase
