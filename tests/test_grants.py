"""SessionHandler's grants: spending and refusing them, producers waiting in line for room,
and the largest event, refused before any grant. Helpers are test_handler.py's."""

from __future__ import annotations

import anyio
import pytest

from mcp_sse_transport import (
    CreditLedger,
    EventTooLargeError,
    GrantError,
    SessionClosedError,
    SessionHandler,
    SessionState,
)

from ._handlers import parse
from .test_handler import (
    Outcome,
    RecordingSink,
    config,
    new_handler,
    settled,
    start,
    wait_waiting,
)

pytestmark = pytest.mark.anyio


# -- grants --------------------------------------------------------------------------------------


async def test_send_event_rejects_spent_grant() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        grant = await handler.request_send(5)
        await handler.send_event(grant, "hello")
        with pytest.raises(GrantError, match="spent"):
            await handler.send_event(grant, "again")
        assert handler.statistics().buffered_events == 1


async def test_send_event_rejects_grant_too_small() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        grant = await handler.request_send(3)
        with pytest.raises(GrantError, match="exceeds"):
            await handler.send_event(grant, "four")
        assert handler.statistics().buffered_events == 0
        await handler.send_event(grant, "ok!")  # still granted: a right-sized event goes
        stats = handler.statistics()
        assert (stats.buffered_events, stats.buffered_bytes, stats.reserved_events) == (1, 3, 0)


async def test_send_event_rejects_another_sessions_grant() -> None:
    with anyio.fail_after(5):
        ours = new_handler()
        theirs = SessionHandler("f" * 32, config())
        grant = await theirs.request_send(5)
        with pytest.raises(GrantError, match="another session"):
            await ours.send_event(grant, "hello")
        assert (ours.statistics().buffered_events, ours.statistics().reserved_events) == (0, 0)
        assert theirs.statistics().reserved_events == 1
        await theirs.send_event(grant, "hello")  # still theirs to spend
        assert theirs.statistics().buffered_events == 1


async def test_ended_session_leaves_another_sessions_grant_alone() -> None:
    """Offering a grant to the wrong session fails without touching either session's accounting:
    here the wrong session has ended, so the refusal is its SessionClosedError (or a GrantError)."""
    with anyio.fail_after(5):
        ours = new_handler()
        theirs = SessionHandler("f" * 32, config(max_buffered_events=1))
        grant = await theirs.request_send(5)
        await ours.close()
        with pytest.raises((SessionClosedError, GrantError)):
            await ours.send_event(grant, "hello")
        assert ours.statistics().reserved_events == 0
        assert theirs.statistics().reserved_events == 1
        await theirs.send_event(grant, "hello")  # still theirs to spend
        assert (theirs.statistics().buffered_events, theirs.statistics().reserved_events) == (1, 0)


async def test_send_event_rejects_grant_not_issued_by_a_session() -> None:
    """A grant no session handed out, here one still waiting in some line, is no permission."""
    with anyio.fail_after(5):
        handler = new_handler()
        stray = CreditLedger(max_events=1, max_bytes=10)
        stray.request(1)
        waiting = stray.request(1)
        with pytest.raises(GrantError):
            await handler.send_event(waiting, "x")
        stats = handler.statistics()
        assert (stats.buffered_events, stats.reserved_events) == (0, 0)


async def test_send_counts_utf8_bytes_and_grants_an_oversized_event_when_empty() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_bytes=4)
        await handler.send("é☃")  # 5 bytes: oversized, granted because the buffer is empty
        stats = handler.statistics()
        assert (stats.buffered_events, stats.buffered_bytes) == (1, 5)


# -- waiting producers ---------------------------------------------------------------------------


async def test_waiting_producers_woken_by_drain_in_fifo_order() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=2)
        sink = RecordingSink(gated=True)
        order: list[str] = []

        async def producer(name: str) -> None:
            grant = await handler.request_send(len(name))
            order.append(name)
            await handler.send_event(grant, name)

        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)  # e0 is being written; its room is not back until the write completes
            spare = await handler.request_send(2)  # the buffer is now full: e0 in flight + this grant
            for queued, name in enumerate(("p1", "p2", "p3"), start=1):
                tg.start_soon(producer, name)
                await wait_waiting(handler, queued)
            # Spending a grant is no drain progress: nobody is woken.
            await handler.send_event(spare, "e1")
            await anyio.wait_all_tasks_blocked()
            assert order == []
            assert handler.statistics().producers_waiting == 3
            # A completed write gives its room back, to the first in line only.
            sink.allow()
            await settled(lambda: order == ["p1"])
            await anyio.wait_all_tasks_blocked()  # e1 is in flight now, p1's event buffered: full again
            assert order == ["p1"]
            assert handler.statistics().producers_waiting == 2
            sink.open()
            await settled(lambda: len(order) == 3)
            await handler.close()
            await runner.done.wait()
        assert order == ["p1", "p2", "p3"]
        assert [e.data for e in parse(sink.data)] == ["e0", "e1", "p1", "p2", "p3"]


async def test_small_request_waits_behind_big_one() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_bytes=10)
        await handler.send("x" * 6)  # no writer yet: stays buffered
        big, small = Outcome(), Outcome()
        async with anyio.create_task_group() as tg:
            tg.start_soon(big.capture, lambda: handler.request_send(8))
            await wait_waiting(handler, 1)
            tg.start_soon(small.capture, lambda: handler.request_send(2))
            await wait_waiting(handler, 2)
            await anyio.wait_all_tasks_blocked()
            assert not small.done.is_set()  # 6 + 2 fits, but FIFO keeps it behind the big one
            runner = await start(tg, handler, RecordingSink())
            await big.done.wait()
            await small.done.wait()
            await handler.close()
            await runner.done.wait()
        assert big.result is not None and big.result.granted
        assert small.result is not None and small.result.granted


async def test_cancelled_waiter_withdraws_and_later_producers_get_granted() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_bytes=10)
        await handler.send("x" * 6)  # no writer: stays buffered, nothing ever drains
        scope = anyio.CancelScope()
        cancelled = anyio.Event()
        small = Outcome()

        async def big() -> None:
            with scope:
                await handler.request_send(8)
            cancelled.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(big)
            await wait_waiting(handler, 1)
            tg.start_soon(small.capture, lambda: handler.request_send(2))
            await wait_waiting(handler, 2)
            scope.cancel()
            await cancelled.wait()
            await small.done.wait()  # granted by the withdrawal alone
        assert scope.cancelled_caught
        assert small.error is None
        assert small.result is not None and small.result.granted
        stats = handler.statistics()
        assert (stats.producers_waiting, stats.reserved_events, stats.buffered_events) == (0, 1, 1)
        assert stats.state is SessionState.OPEN


# -- the largest event ---------------------------------------------------------------------------


async def test_an_event_over_max_event_bytes_is_refused_before_any_grant_and_the_session_goes_on() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_event_bytes=10, replay_max_bytes=10, max_buffered_bytes=10)
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            with pytest.raises(EventTooLargeError) as refused:
                await handler.send("x" * 11)
            assert (refused.value.size, refused.value.limit) == (11, 10)
            with pytest.raises(EventTooLargeError):
                await handler.request_send(11)
            stats = handler.statistics()
            assert (stats.state, stats.buffered_events, stats.reserved_events) == (SessionState.OPEN, 0, 0)
            await handler.send("x" * 10)  # the limit itself is an event the log keeps
            await handler.close()
            await runner.done.wait()
        assert [event.data for event in parse(sink.data)] == ["x" * 10]
