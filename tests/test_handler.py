"""SessionHandler against an in-memory sink: ordering, heartbeats, statistics; and the helpers.

The sink is the handler's documented interface (an async callable taking bytes); the one here
records every chunk it is called with and, when gated, holds each write until the test allows
it, which stands in for a client that reads slowly or not at all. No socket, no HTTP. Grants
and waiting producers are tested in test_grants.py, slow consumers and endings in
test_endings.py, resumes in test_replay.py, the state machine alone in test_stream_state.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import pytest

from mcp_sse_transport import (
    Grant,
    SessionHandler,
    SessionState,
    SlowConsumerError,
    encode_event,
)
from mcp_sse_transport.events import HEARTBEAT
from mcp_sse_transport.ids import parse_event_id
from mcp_sse_transport.stream_state import FailureKind

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


async def settled(condition: Callable[[], bool]) -> None:
    """Let every other task run until all of them are blocked, then check that ``condition``
    holds: for a state other tasks reach without waiting on anything this test controls."""
    await anyio.wait_all_tasks_blocked()
    assert condition()


async def wait_waiting(handler: SessionHandler, producers: int) -> None:
    """Wait until the producers started so far are blocked, ``producers`` of them queued for room."""
    await settled(lambda: handler.statistics().producers_waiting == producers)


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
    await settled(lambda: handler.attached or runner.done.is_set())  # run attaches before it first waits
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


# -- resuming (the tests are in test_replay.py) ---------------------------------------------


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


# -- release, last_token, failure -----------------------------------------------------------------


async def test_release_ends_the_connections_stream_cleanly_and_the_session_stays_open() -> None:
    """Streamable HTTP's polling: the stream ends with its terminator, no final event, and the
    session waits for the client to come back."""
    with anyio.fail_after(5):
        handler = new_handler()
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e1")
            await sink.wait_chunks(1)
            await handler.release()
            assert runner.done.is_set(), "release returns once the connection's stream ended"
            assert runner.graceful is True, "a clean end: the terminator is written"
            assert sink.chunks == [message(1, "e1")], "no final event"
            stats = handler.statistics()
            assert (stats.state, stats.attached) == (SessionState.OPEN, False)
            assert not handler.failed and handler.failure is None
            await handler.send("e2")  # produced while the client is away
        assert not handler.ended


async def test_a_run_after_release_resumes_from_the_last_event_seen() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        first_sink, second_sink = RecordingSink(), RecordingSink()
        async with anyio.create_task_group() as tg:
            first = await start(tg, handler, first_sink)
            await handler.send("e1")
            await first_sink.wait_chunks(1)
            await handler.release()
            await handler.send("e2")
            second = await start(tg, handler, second_sink, after="1")
            await handler.send("e3")
            await handler.close()
            await second.done.wait()
        assert first.graceful is True and second.graceful is True
        assert second_sink.data == message(2, "e2") + message(3, "e3")
        assert handler.statistics().connections == 2
        assert handler.state is SessionState.CLOSED


async def test_release_without_a_connection_does_nothing() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        await handler.release()
        assert handler.state is SessionState.OPEN
        assert not handler.attached


async def test_release_waits_for_the_write_in_flight_and_leaves_what_is_queued_for_the_resume() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        sink = RecordingSink(gated=True)
        released = anyio.Event()

        async def release() -> None:
            await handler.release()
            released.set()

        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e1")
            await sink.wait_chunks(1)  # e1 is being written
            await handler.send("e2")
            tg.start_soon(release)
            await anyio.wait_all_tasks_blocked()
            assert not released.is_set(), "the write in flight is not cut short"
            sink.open()
            await released.wait()
            await runner.done.wait()
            assert runner.graceful is True
            assert sink.data == message(1, "e1"), "e2 waits for the next connection"
            resumed = RecordingSink()
            second = await start(tg, handler, resumed, after="1")
            await handler.close()
            await second.done.wait()
        assert resumed.data == message(2, "e2")


async def test_last_token_is_the_newest_stored_events_and_a_continuing_handler_starts_from_it() -> None:
    with anyio.fail_after(5):
        handler = new_handler()
        assert handler.last_token is None
        await handler.send("e1")
        await handler.send("e2")
        assert handler.last_token == "2"
        continued = SessionHandler(SESSION, config(), last_token="7")
        assert continued.last_token == "7"


async def test_failure_says_why_the_session_broke() -> None:
    with anyio.fail_after(5):
        open_handler = new_handler()
        assert open_handler.failure is None

        closed = new_handler()
        await closed.close()
        assert closed.failure is None, "a graceful close is no failure"

        aborted = new_handler()
        aborted.abort("the server is going away")
        assert aborted.failure is FailureKind.CONNECTION_LOST

        evicted = new_handler(max_buffered_events=1, slow_consumer_policy="disconnect")
        await evicted.send("fills the buffer")
        with pytest.raises(SlowConsumerError):
            await evicted.send("no room")
        assert evicted.failure is FailureKind.SLOW_CONSUMER

        expired = new_handler(session_grace=0.01)
        await expired.linger()  # nobody ever attaches
        assert expired.failure is FailureKind.EXPIRED
        assert all(h.failed for h in (aborted, evicted, expired))
