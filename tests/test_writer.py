"""How a SessionHandler's stream ends: slow consumers cut loose, dead connections, expiry, and
close, send_error and shutdown draining what is buffered. Helpers are test_handler.py's."""

from __future__ import annotations

import json

import anyio
import pytest

from mcp_sse_transport import (
    ConnectionLostError,
    ErrorCode,
    SessionClosedError,
    SessionExpiredError,
    SessionState,
    SlowConsumerError,
)

from ._handlers import parse
from .test_handler import (
    Outcome,
    RecordingSink,
    message,
    new_handler,
    settled,
    start,
    wait_waiting,
)

pytestmark = pytest.mark.anyio


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
            await settled(lambda: handler.state is SessionState.CLOSING)
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


# -- the epilogue ------------------------------------------------------------------------------------

EPILOGUE = b'event: message\r\ndata: {"jsonrpc":"2.0","id":7,"error":{"code":-32055,"message":"lost"}}\r\n\r\n'


async def test_the_epilogue_follows_the_final_event_of_a_stream_cut_loose() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=1, grant_timeout=0.1, drain_timeout=0.1)
        handler.epilogue = EPILOGUE
        sink = RecordingSink(gated=True)  # the client stopped reading
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)  # e0 in flight takes the buffer's one place
            with pytest.raises(SlowConsumerError):
                await handler.send("e1")
            await runner.done.wait()
        assert runner.graceful is False
        final = sink.chunks[-1]
        assert final.endswith(EPILOGUE), "one write: the final event, then the epilogue"
        error, answer = parse(final)
        assert error.event == "error"
        assert json.loads(error.data)["code"] == ErrorCode.SLOW_CONSUMER
        assert answer.event == "message"
        assert json.loads(answer.data)["id"] == 7
        assert sink.data.count(EPILOGUE) == 1


async def test_no_epilogue_after_a_graceful_close_a_send_error_or_a_shutdown() -> None:
    with anyio.fail_after(5):
        for end in ("close", "send_error", "shutdown"):
            handler = new_handler()
            handler.epilogue = EPILOGUE
            sink = RecordingSink()
            async with anyio.create_task_group() as tg:
                runner = await start(tg, handler, sink)
                await handler.send("e0")
                if end == "close":
                    await handler.close()
                elif end == "send_error":
                    await handler.send_error(-32000, "bye")
                else:
                    await handler.shutdown()
                await runner.done.wait()
            assert runner.graceful is True, end
            assert EPILOGUE not in sink.data, end
            assert parse(sink.data)[0].data == "e0"


async def test_no_epilogue_on_a_stream_that_breaks_without_a_final_event() -> None:
    """``abort`` ends the stream with no final event: there is nothing for the epilogue to follow."""
    with anyio.fail_after(5):
        handler = new_handler()
        handler.epilogue = EPILOGUE
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)
            handler.abort("the server is going away")
            await runner.done.wait()
        assert runner.graceful is False
        assert sink.chunks == [message(1, "e0")]


async def test_an_epilogue_cleared_before_the_break_is_not_written() -> None:
    with anyio.fail_after(5):
        handler = new_handler(max_buffered_events=1, slow_consumer_policy="disconnect", drain_timeout=0.1)
        handler.epilogue = EPILOGUE
        sink = RecordingSink(gated=True)
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e0")
            await sink.wait_chunks(1)
            handler.epilogue = None  # answered meanwhile: nobody waits any more
            with pytest.raises(SlowConsumerError):
                await handler.send("e1")
            await runner.done.wait()
        (farewell,) = parse(sink.chunks[-1])
        assert farewell.event == "error"
        assert EPILOGUE not in sink.data
