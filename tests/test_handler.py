"""SessionHandler against an in-memory sink: ordering, flow control, deadlines, heartbeats, endings.

The sink is the handler's documented interface (an async callable taking bytes); the one here
records every chunk it is called with and, when gated, holds each write until the test allows
it, which stands in for a client that reads slowly or not at all. No socket, no HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from mcp_sse_transport import (
    BEFORE_FIRST,
    ConnectionLostError,
    CreditLedger,
    ErrorCode,
    EventTooLargeError,
    Grant,
    GrantError,
    InMemoryEventStore,
    Replay,
    SessionClosedError,
    SessionExpiredError,
    SessionHandler,
    SessionState,
    SlowConsumerError,
    encode_event,
)
from mcp_sse_transport.events import HEARTBEAT
from mcp_sse_transport.handler import REPLAY_PAGE
from mcp_sse_transport.ids import parse_event_id

from ._handlers import parse, quiet_config

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
SECRET = "fedcba9876543210fedcba9876543210"
config = quiet_config


def new_handler(**overrides: object) -> SessionHandler:
    return SessionHandler(SESSION, config(**overrides), secret=SECRET)


class RecordingSink:
    """Records each chunk as its write starts; when gated, each write waits for a permit."""

    def __init__(self, *, gated: bool = False) -> None:
        self.chunks: list[bytes] = []
        self.completed = 0
        self._gated = gated
        self._permits = 0
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    async def __call__(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self._notify()
        if self._gated:
            await self.wait_for(lambda: not self._gated or self._permits > 0)
            if self._gated:
                self._permits -= 1
        self.completed += 1
        self._notify()

    def allow(self, writes: int = 1) -> None:
        self._permits += writes
        self._notify()

    def open(self) -> None:
        self._gated = False
        self._notify()

    async def wait_chunks(self, count: int) -> None:
        await self.wait_for(lambda: len(self.chunks) >= count)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


async def wait_until(condition: Callable[[], bool]) -> None:
    """Wait for a condition that other tasks make true (no clock involved)."""
    while not condition():
        await anyio.lowlevel.checkpoint()


async def wait_waiting(handler: SessionHandler, producers: int) -> None:
    """Wait until ``producers`` producers are queued for room."""
    await wait_until(lambda: handler.statistics().producers_waiting == producers)


class Runner:
    """Runs ``handler.run(sink)`` as a task; records what it returned and when it did."""

    def __init__(
        self, handler: SessionHandler, sink: RecordingSink, *, preface: bytes = b"", after: str | None = None
    ) -> None:
        self.handler = handler
        self.sink = sink
        self.preface = preface
        self.after = after
        self.graceful: bool | None = None
        self.done = anyio.Event()

    async def __call__(self) -> None:
        try:
            self.graceful = await self.handler.run(self.sink, preface=self.preface, after=self.after)
        finally:
            self.done.set()


async def start(
    tg: anyio.abc.TaskGroup,
    handler: SessionHandler,
    sink: RecordingSink,
    *,
    preface: bytes = b"",
    after: str | None = None,
) -> Runner:
    """Start a writer and wait until its connection is attached, so sends reach it."""
    runner = Runner(handler, sink, preface=preface, after=after)
    tg.start_soon(runner)
    await wait_until(lambda: handler.attached or runner.done.is_set())
    return runner


class Outcome:
    """What a producer task ended with: a grant, None, or an exception."""

    def __init__(self) -> None:
        self.result: Grant | None = None
        self.error: BaseException | None = None
        self.done = anyio.Event()

    async def capture(self, call: Callable[[], Awaitable[Grant | None]]) -> None:
        try:
            self.result = await call()
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()


def message(n: int, data: str, event: str | None = "message") -> bytes:
    """The wire form of the session's ``n``-th event (the in-memory store's tokens count from 1)."""
    return encode_event(data, event=event, id=f"{SESSION}.{SECRET}:{n}")


# -- ordering and coalescing ---------------------------------------------------------------------


async def test_events_written_in_order_with_increasing_ids() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            for i in range(20):
                await handler.send(f"event {i}")
            await handler.close()
            await runner.done.wait()
        assert sink.data == b"".join(message(i + 1, f"event {i}") for i in range(20))
        events = parse(sink.data)
        assert [e.data for e in events] == [f"event {i}" for i in range(20)]
        assert [e.id for e in events] == [f"{SESSION}.{SECRET}:{i + 1}" for i in range(20)]
        assert runner.graceful is True
        assert handler.state is SessionState.CLOSED
        assert not handler.failed


async def test_events_ready_together_are_coalesced() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        sink = RecordingSink(gated=True)
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("first")
            await sink.wait_chunks(1)  # the writer is inside the first write
            await handler.send("second")
            await handler.send("third", event="custom")
            await handler.send(b"fourth")
            sink.allow(2)
            await sink.wait_for(lambda: sink.completed == 2)
            assert sink.chunks == [
                message(1, "first"),
                message(2, "second") + message(3, "third", "custom") + message(4, "fourth"),
            ]
            sink.open()
            await handler.close()
            await runner.done.wait()
        assert [(e.event, e.data) for e in parse(sink.data)] == [
            ("message", "first"),
            ("message", "second"),
            ("custom", "third"),
            ("message", "fourth"),
        ]
        assert handler.statistics().events_sent == 4


async def test_events_sent_before_run_go_out_in_one_write_after_preface() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        await handler.send("a")
        await handler.send("b", event=None)
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink, preface=b": hello\r\n\r\n")
            await sink.wait_chunks(2)
            await handler.close()
            await runner.done.wait()
        assert sink.chunks == [b": hello\r\n\r\n", message(1, "a") + message(2, "b", None)]
        assert handler.statistics().bytes_sent == len(sink.data)


async def test_second_run_while_attached_rejected() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            with pytest.raises(RuntimeError, match="attached"):
                await handler.run(RecordingSink())
            await handler.send("still flowing")  # the first connection is undisturbed
            await sink.wait_chunks(1)
            await handler.close()
            await runner.done.wait()
        assert sink.chunks == [message(1, "still flowing")]
        assert handler.statistics().connections == 1


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
            await wait_until(lambda: order == ["p1"])
            await anyio.wait_all_tasks_blocked()  # e1 is in flight now, p1's event buffered: full again
            assert order == ["p1"]
            assert handler.statistics().producers_waiting == 2
            sink.open()
            await wait_until(lambda: len(order) == 3)
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


# -- slow consumers and dead connections ---------------------------------------------------------


async def test_block_policy_slow_consumer_times_out() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=2, grant_timeout=0.1, drain_timeout=0.1)
        sink = RecordingSink(gated=True)  # the client stopped reading: no write ever completes
        other = Outcome()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)
            await handler.send("e1")
            tg.start_soon(other.capture, lambda: handler.request_send(1))
            await wait_waiting(handler, 1)
            with pytest.raises(SlowConsumerError, match="slow consumer"):
                await handler.request_send(1)
            stats = handler.statistics()
            assert (stats.buffered_events, stats.buffered_bytes, stats.producers_waiting) == (0, 0, 0)
            assert stats.state is SessionState.BROKEN
            await other.done.wait()
            await runner.done.wait()
        assert isinstance(other.error, SlowConsumerError)
        assert isinstance(other.error, anyio.BrokenResourceError)
        assert runner.graceful is False
        assert handler.failed
        assert handler.state is SessionState.BROKEN
        # The writer gave the farewell error event one try: e1 was dropped, not written.
        assert len(sink.chunks) == 2
        assert sink.chunks[0] == message(1, "e0")
        (farewell,) = parse(sink.chunks[1])
        assert farewell.event == "error"
        assert json.loads(farewell.data)["code"] == ErrorCode.SLOW_CONSUMER
        with pytest.raises(SlowConsumerError):
            await handler.send("late")


async def test_disconnect_policy_fails_first_producer_at_once() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=1, slow_consumer_policy="disconnect", drain_timeout=0.1)
        sink = RecordingSink(gated=True)
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)
            # grant_timeout is a minute: only the policy can make this fail within fail_after.
            with pytest.raises(SlowConsumerError):
                await handler.request_send(1)
            stats = handler.statistics()
            assert (stats.buffered_events, stats.producers_waiting, stats.reserved_events) == (0, 0, 0)
            await runner.done.wait()
        assert runner.graceful is False
        assert handler.failed
        with pytest.raises(SlowConsumerError):
            await handler.send("late")


async def test_disconnect_policy_does_not_fire_while_there_is_room() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=3, slow_consumer_policy="disconnect")
        for i in range(3):
            await handler.send(f"e{i}")
        assert handler.state is SessionState.OPEN
        with pytest.raises(SlowConsumerError):
            await handler.send("e3")
        assert handler.failed


async def test_granted_producer_gets_the_sessions_failure() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=1, slow_consumer_policy="disconnect")
        grant = await handler.request_send(5)
        with pytest.raises(SlowConsumerError):
            await handler.request_send(5)
        with pytest.raises(SlowConsumerError):
            await handler.send_event(grant, "hello")
        assert handler.statistics().reserved_events == 0


async def test_write_timeout_without_grace_ends_session_with_connection_lost() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=1, write_timeout=0.1, session_grace=0)
        sink = RecordingSink(gated=True)
        waiter = Outcome()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)
            tg.start_soon(waiter.capture, lambda: handler.request_send(1))
            await waiter.done.wait()
            await runner.done.wait()
        assert isinstance(waiter.error, ConnectionLostError)
        assert runner.graceful is False
        assert handler.failed
        assert handler.state is SessionState.BROKEN
        assert sink.completed == 0
        assert handler.statistics().buffered_events == 0
        with pytest.raises(ConnectionLostError):
            await handler.send("late")


async def test_write_timeout_with_grace_detaches_then_session_expires() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=1, write_timeout=0.1, session_grace=0.1)
        sink = RecordingSink(gated=True)
        waiter = Outcome()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)
            tg.start_soon(waiter.capture, lambda: handler.request_send(1))
            await wait_waiting(handler, 1)
            await runner.done.wait()  # the stalled write ended this connection...
            assert runner.graceful is False
            stats = handler.statistics()
            assert (stats.state, stats.attached) == (SessionState.OPEN, False)  # ...not the session
            assert not handler.failed
            assert not waiter.done.is_set()
            await handler.linger()  # no resume within session_grace
        assert isinstance(waiter.error, SessionExpiredError)
        assert isinstance(waiter.error, anyio.BrokenResourceError)
        assert handler.failed
        assert handler.state is SessionState.BROKEN
        assert handler.statistics().buffered_events == 0


async def test_failing_sink_without_grace_ends_session_with_connection_lost() -> None:
    with anyio.fail_after(5):
        handler = new_handler(session_grace=0)

        async def broken_sink(chunk: bytes) -> None:
            raise OSError("connection reset")

        await handler.send("e0")
        assert await handler.run(broken_sink) is False
        assert handler.failed
        with pytest.raises(ConnectionLostError):
            await handler.send("e1")


async def test_connection_lost_without_grace_releases_waiting_producers() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=1, session_grace=0)
        sink = RecordingSink(gated=True)
        waiters = [Outcome(), Outcome()]
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)
            for waiter in waiters:
                tg.start_soon(waiter.capture, lambda: handler.request_send(1))
            await wait_waiting(handler, 2)
            handler.connection_lost()
            for waiter in waiters:
                await waiter.done.wait()
            await runner.done.wait()  # the stuck write was abandoned too
        for waiter in waiters:
            assert isinstance(waiter.error, ConnectionLostError)
        assert runner.graceful is False
        assert handler.failed
        stats = handler.statistics()
        assert (stats.state, stats.buffered_events, stats.producers_waiting) == (SessionState.BROKEN, 0, 0)
        assert sink.completed == 0
        with pytest.raises(ConnectionLostError):
            await handler.send("late")


async def drop_and_resume(handler: SessionHandler) -> tuple[Runner, Runner, RecordingSink]:
    """A connection that saw e1, had e2 in flight and missed e3 drops; e4 comes while detached;
    a resume from the last id the client saw, then e5 live, then close. Returns both runs and the
    resumed connection's sink."""
    first_sink = RecordingSink(gated=True)
    second_sink = RecordingSink()
    async with anyio.create_task_group() as tg:
        first = await start(tg, handler, first_sink)
        await handler.send("e1")
        first_sink.allow()
        await first_sink.wait_for(lambda: first_sink.completed == 1)  # the client saw e1
        await handler.send("e2")
        await first_sink.wait_chunks(2)  # e2 is in flight and never arrives
        await handler.send("e3")
        handler.connection_lost()
        await first.done.wait()
        stats = handler.statistics()
        assert (stats.state, stats.attached, handler.failed) == (SessionState.OPEN, False, False)
        await handler.send("e4")  # produced while detached
        seen = parse(first_sink.chunks[0])
        assert [event.data for event in seen] == ["e1"]
        parsed = parse_event_id(seen[0].id or "")
        assert parsed is not None and parsed[0] == handler.session_id
        second = await start(tg, handler, second_sink, after=parsed[1])
        await handler.send("e5")  # live, after the replay
        await handler.close()
        await second.done.wait()
    return first, second, second_sink


async def test_connection_lost_with_grace_keeps_session_and_resume_replays_missed_events() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        first, second, second_sink = await drop_and_resume(handler)
    assert first.graceful is False
    # Everything after the last event the client saw, exactly once, in order, same ids.
    assert second_sink.data == b"".join(message(n, f"e{n}") for n in range(2, 6))
    assert second.graceful is True
    assert handler.state is SessionState.CLOSED
    assert handler.statistics().connections == 2


# -- heartbeats ----------------------------------------------------------------------------------


async def test_idle_stream_gets_heartbeats() -> None:
    with anyio.fail_after(5):
        handler = new_handler(heartbeat_interval=0.05)
        sink = RecordingSink()
        event = message(1, "event")

        def heartbeat_after_event() -> bool:
            return event in sink.chunks and sink.chunks[-1] == HEARTBEAT

        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await sink.wait_chunks(2)
            assert sink.chunks == [HEARTBEAT, HEARTBEAT]
            await handler.send("event")
            await sink.wait_for(heartbeat_after_event)  # idle again after the event: heartbeats resume
            await handler.close()
            await runner.done.wait()
        assert sink.chunks.count(event) == 1
        assert sink.chunks.index(event) >= 2
        assert {chunk for chunk in sink.chunks if chunk != event} == {HEARTBEAT}
        stats = handler.statistics()
        assert stats.heartbeats_sent == len(sink.chunks) - 1
        assert stats.events_sent == 1
        assert stats.bytes_sent == len(sink.data)
        assert [e.data for e in parse(sink.data)] == ["event"]


async def test_busy_stream_gets_no_heartbeats() -> None:
    interval = 0.1
    with anyio.fail_after(5):
        handler = new_handler(heartbeat_interval=interval)
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            # Each event is sent as soon as the previous one reached the sink, for several intervals:
            # the stream is never idle for anything close to an interval.
            until = anyio.current_time() + 3 * interval
            sent = 0
            while anyio.current_time() < until:
                await handler.send(f"e{sent}")
                sent += 1
                await sink.wait_chunks(sent)
            assert HEARTBEAT not in sink.chunks
            assert handler.statistics().heartbeats_sent == 0
            # Once idle, the heartbeat comes: the timer was live all along.
            await sink.wait_chunks(sent + 1)
            assert sink.chunks[sent] == HEARTBEAT
            await handler.close()
            await runner.done.wait()
        assert sink.chunks[:sent] == [message(i + 1, f"e{i}") for i in range(sent)]


# -- endings -------------------------------------------------------------------------------------


async def test_send_error_after_buffered_events_then_graceful_end() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        sink = RecordingSink(gated=True)
        ended = anyio.Event()

        async def send_error() -> None:
            await handler.send_error(-32000, "bad things", {"why": "test"})
            ended.set()

        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)
            await handler.send("e1")
            await handler.send("e2")
            tg.start_soon(send_error)
            await wait_until(lambda: handler.state is SessionState.CLOSING)
            with pytest.raises(SessionClosedError):
                await handler.send("refused")
            await anyio.wait_all_tasks_blocked()
            assert not ended.is_set()  # waits for the drain
            sink.open()
            await ended.wait()
            await runner.done.wait()
        events = parse(sink.data)
        assert [(e.event, e.data) for e in events[:3]] == [("message", "e0"), ("message", "e1"), ("message", "e2")]
        assert events[3].event == "error"
        assert json.loads(events[3].data) == {"code": -32000, "message": "bad things", "data": {"why": "test"}}
        assert len(events) == 4
        assert runner.graceful is True
        assert not handler.failed
        assert handler.state is SessionState.CLOSED


async def test_close_drains_then_run_returns() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=3)
        sink = RecordingSink(gated=True)
        closed = anyio.Event()
        waiter = Outcome()

        async def close() -> None:
            await handler.close()
            closed.set()

        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            for i in range(3):
                await handler.send(f"e{i}")
            await sink.wait_chunks(1)
            tg.start_soon(waiter.capture, lambda: handler.request_send(1))
            await wait_waiting(handler, 1)
            tg.start_soon(close)
            await waiter.done.wait()  # a producer waiting for room is refused by the close
            assert isinstance(waiter.error, SessionClosedError)
            assert isinstance(waiter.error, anyio.ClosedResourceError)
            await anyio.wait_all_tasks_blocked()
            assert not closed.is_set()
            assert not runner.done.is_set()
            sink.open()
            await closed.wait()
            await runner.done.wait()
        assert [e.data for e in parse(sink.data)] == ["e0", "e1", "e2"]
        assert runner.graceful is True
        assert not handler.failed
        assert handler.state is SessionState.CLOSED
        assert handler.statistics().buffered_events == 0


async def test_close_without_connection_and_close_twice() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        await handler.close()
        await handler.close()
        assert handler.state is SessionState.CLOSED
        assert not handler.failed
        with pytest.raises(SessionClosedError):
            await handler.request_send(1)
        assert await handler.run(RecordingSink()) is False  # an ended session writes nothing


async def test_close_drain_timeout_breaks_session() -> None:
    with anyio.fail_after(5):
        handler = new_handler(drain_timeout=0.1)
        sink = RecordingSink(gated=True)
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)
            await handler.close()  # returns after drain_timeout: the sink never completes
            await runner.done.wait()
        assert runner.graceful is False
        assert handler.failed
        assert handler.state is SessionState.BROKEN
        assert handler.statistics().buffered_events == 0


async def test_final_event_stalled_past_write_timeout_breaks_the_session() -> None:
    """A write that stalls past ``write_timeout`` means a dead connection, the final one too: the
    error event never reached the client, so the end is not graceful (CLOSED promises that
    everything was written, and ``run`` returning True asks for the terminating chunk)."""
    with anyio.fail_after(5):
        handler = new_handler(write_timeout=0.1)
        sink = RecordingSink(gated=True)
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            sink.allow()
            await sink.wait_for(lambda: sink.completed == 1)
            await handler.send_error(-32000, "bye")  # the client stops reading now
            await runner.done.wait()
        assert len(sink.chunks) == 2
        assert parse(sink.chunks[1])[0].event == "error"
        assert sink.completed == 1  # the error event's write never completed
        assert runner.graceful is False
        assert handler.failed
        assert handler.state is SessionState.BROKEN


async def test_shutdown_writes_server_shutdown_event_with_retry() -> None:
    with anyio.fail_after(5):
        handler = new_handler(retry_interval=0.25)
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("last words")
            await handler.shutdown()
            await runner.done.wait()
        final = sink.chunks[-1]
        assert b"\r\nretry: 250\r\n" in final
        assert b"id:" not in final  # a stream-ending error carries no id: clients resume from their last message
        events = parse(sink.data)
        assert [e.event for e in events] == ["message", "error"]
        assert events[0].data == "last words"
        assert events[1].retry == 250
        body = json.loads(events[1].data)
        assert body["code"] == ErrorCode.SERVER_SHUTDOWN
        assert int(ErrorCode.SERVER_SHUTDOWN) == -32051
        assert body["message"]
        assert runner.graceful is True
        assert not handler.failed
        assert handler.state is SessionState.CLOSED
        with pytest.raises(SessionClosedError):
            await handler.send("after")


# -- statistics ----------------------------------------------------------------------------------


async def test_statistics_are_consistent() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=2)
        stats = handler.statistics()
        assert stats.session == SESSION[:8] == handler.tag
        assert SESSION not in repr(handler)
        assert (stats.state, stats.attached, stats.connections) == (SessionState.OPEN, False, 0)
        assert (stats.buffered_events, stats.buffered_bytes, stats.reserved_events, stats.producers_waiting) == (
            0,
            0,
            0,
            0,
        )
        assert (stats.events_sent, stats.bytes_sent, stats.heartbeats_sent, stats.last_write) == (0, 0, 0, None)

        grant = await handler.request_send(10)
        assert handler.statistics().reserved_events == 1
        await handler.send_event(grant, "0123456789")
        await handler.send("abc")
        stats = handler.statistics()
        assert (stats.buffered_events, stats.buffered_bytes, stats.reserved_events) == (2, 13, 0)

        waiter = Outcome()
        sink = RecordingSink(gated=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter.capture, lambda: handler.request_send(1))
            await wait_waiting(handler, 1)
            runner = await start(tg, handler, sink)
            await sink.wait_chunks(1)
            stats = handler.statistics()
            # In flight still counts as buffered until the write completes.
            assert (stats.attached, stats.connections, stats.buffered_events) == (True, 1, 2)
            assert (stats.events_sent, stats.bytes_sent, stats.last_write) == (0, 0, None)
            sink.open()
            await waiter.done.wait()
            assert waiter.result is not None
            stats = handler.statistics()
            assert (stats.buffered_events, stats.buffered_bytes, stats.reserved_events) == (0, 0, 1)
            assert stats.producers_waiting == 0
            assert stats.events_sent == 2
            assert stats.bytes_sent == len(sink.data) == len(message(1, "0123456789") + message(2, "abc"))
            assert stats.last_write is not None
            await handler.send_event(waiter.result, "z")
            await handler.close()
            await runner.done.wait()
        stats = handler.statistics()
        assert (stats.state, stats.attached, stats.events_sent, stats.buffered_events, stats.reserved_events) == (
            SessionState.CLOSED,
            False,
            3,
            0,
            0,
        )
        assert stats.bytes_sent == len(sink.data)
        assert stats.heartbeats_sent == 0


# -- byte bounds: the largest event, replay in pieces ------------------------------------------


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


class _PagedStore(InMemoryEventStore):
    """The in-memory store, noting how many events each replay call returned."""

    def __init__(self) -> None:
        super().__init__(max_events=5000, max_bytes=64 * 1024 * 1024)
        self.pages: list[int] = []

    async def replay(
        self, session_id: str, after: str, until: str | None = None, *, limit: int | None = None
    ) -> Replay | None:
        replay = await super().replay(session_id, after, until, limit=limit)
        if replay is not None and limit is not None:
            self.pages.append(len(replay.events))
        return replay


async def test_a_long_replay_is_read_from_the_store_in_pages_and_arrives_whole_in_order() -> None:
    count = 3 * REPLAY_PAGE + 5
    with anyio.fail_after(10):
        store = _PagedStore()
        handler = SessionHandler(SESSION, config(max_buffered_events=count), store, secret=SECRET)
        for n in range(count):
            await handler.send(f"e{n}")  # detached: stored and buffered, replayed from the store on attach
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink, after=BEFORE_FIRST)
            await handler.close()
            await runner.done.wait()
        events = parse(sink.data)
        assert [event.data for event in events] == [f"e{n}" for n in range(count)]
        assert [event.id for event in events] == [f"{SESSION}.{SECRET}:{n + 1}" for n in range(count)]
        assert store.pages == [REPLAY_PAGE, REPLAY_PAGE, REPLAY_PAGE, 5]
