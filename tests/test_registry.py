"""SessionRegistry: sessions by id, statistics across them, and a concurrent shutdown."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import pytest

from mcp_sse_transport import ErrorCode, SessionHandler, SessionRegistry, SessionState

from ._handlers import parse, quiet_config

pytestmark = pytest.mark.anyio


@dataclass(frozen=True)
class Entry:
    """What a registry holds: anything with a ``handler``."""

    handler: SessionHandler


def make_handler(session_id: str, **overrides: object) -> SessionHandler:
    return SessionHandler(session_id, quiet_config(**overrides))


async def settled(condition: Callable[[], bool]) -> None:
    """Wait until every other task is blocked (nothing left to run that could change the state),
    then require ``condition``: what the other tasks were to make true must be true by then."""
    await anyio.wait_all_tasks_blocked()
    assert condition()


class GatedSink:
    """Records chunks; every write waits until the gate opens (a client that is not reading yet)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.gate = anyio.Event()

    async def __call__(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        await self.gate.wait()


def test_add_get_discard() -> None:
    registry: SessionRegistry[Entry] = SessionRegistry()
    a, b = Entry(make_handler("a" * 32)), Entry(make_handler("b" * 32))
    assert len(registry) == 0
    registry.add("a" * 32, a)
    registry.add("b" * 32, b)
    assert len(registry) == 2
    assert "a" * 32 in registry
    assert "c" * 32 not in registry
    assert registry.get("a" * 32) is a
    assert registry.get("c" * 32) is None
    assert list(registry) == ["a" * 32, "b" * 32]
    assert dict(registry.items()) == {"a" * 32: a, "b" * 32: b}
    registry.discard("a" * 32)
    registry.discard("a" * 32)  # discarding what is gone is fine
    registry.discard("never there")
    assert registry.get("a" * 32) is None
    assert list(registry) == ["b" * 32]


def test_duplicate_add_rejected_and_original_kept() -> None:
    registry: SessionRegistry[Entry] = SessionRegistry()
    first, second = Entry(make_handler("a" * 32)), Entry(make_handler("a" * 32))
    registry.add("a" * 32, first)
    with pytest.raises(KeyError):
        registry.add("a" * 32, second)
    assert registry.get("a" * 32) is first
    assert len(registry) == 1


def test_duplicate_add_error_does_not_leak_the_session_id() -> None:
    registry: SessionRegistry[Entry] = SessionRegistry()
    session_id = "0123456789abcdef" * 2
    registry.add(session_id, Entry(make_handler(session_id)))
    with pytest.raises(KeyError) as caught:
        registry.add(session_id, Entry(make_handler(session_id)))
    assert session_id not in str(caught.value)


async def test_refuse_new_marks_the_registry_shutting_down_and_touches_no_session() -> None:
    with anyio.fail_after(5):
        registry: SessionRegistry[Entry] = SessionRegistry()
        handler = make_handler("a" * 32)
        registry.add("a" * 32, Entry(handler))
        assert not registry.shutting_down
        registry.refuse_new()
        assert registry.shutting_down
        assert registry.statistics().shutting_down
        registry.refuse_new()
        assert registry.shutting_down, "idempotent"
        assert handler.state is SessionState.OPEN, "open sessions go on"
        await handler.send("still flowing")
        assert registry.get("a" * 32) is not None and len(registry) == 1


async def test_statistics_aggregate() -> None:
    with anyio.fail_after(5):
        registry: SessionRegistry[Entry] = SessionRegistry()
        empty = registry.statistics()
        assert (empty.open_sessions, empty.buffered_events, empty.events_sent, empty.sessions) == (0, 0, 0, ())
        assert not empty.shutting_down

        one = make_handler("1" * 32)
        await one.send("abc")
        await one.send("defg")
        two = make_handler("2" * 32, max_buffered_events=1)
        await two.send("hi")
        three = make_handler("3" * 32)
        for session_id, handler in (("1" * 32, one), ("2" * 32, two), ("3" * 32, three)):
            registry.add(session_id, Entry(handler))

        sent: list[bytes] = []

        async def sink(chunk: bytes) -> None:
            sent.append(chunk)

        async with anyio.create_task_group() as tg:
            tg.start_soon(three.run, sink)
            await three.send("x")
            await three.send("y")
            await settled(lambda: three.statistics().events_sent == 2)
            tg.start_soon(two.send, "waits")  # two's buffer is full and nothing drains it
            await settled(lambda: two.statistics().producers_waiting == 1)

            stats = registry.statistics()
            assert stats.open_sessions == 3
            assert stats.buffered_events == 3
            assert stats.buffered_bytes == 3 + 4 + 2
            assert stats.producers_waiting == 1
            assert stats.events_sent == 2
            assert not stats.shutting_down
            assert [s.session for s in stats.sessions] == ["11111111", "22222222", "33333333"]
            assert stats.sessions[2].attached
            assert stats.sessions == tuple(h.statistics() for h in (one, two, three))
            tg.cancel_scope.cancel()


async def test_shutdown_closes_every_handler_concurrently() -> None:
    """Each session's drain waits until every session is closing: a shutdown that closed them
    one after another would wait out the first one's drain_timeout and break it."""
    with anyio.fail_after(5):
        registry: SessionRegistry[Entry] = SessionRegistry()
        handlers = [make_handler(c * 32, drain_timeout=2.0, retry_interval=0.5) for c in "abc"]
        sinks = [GatedSink() for _ in handlers]
        for handler in handlers:
            registry.add(handler.session_id, Entry(handler))
        graceful: list[bool] = []

        async def run(handler: SessionHandler, sink: GatedSink) -> None:
            graceful.append(await handler.run(sink))

        async def open_gates_once_all_are_closing() -> None:
            await settled(lambda: all(h.state is SessionState.CLOSING for h in handlers))
            for sink in sinks:
                sink.gate.set()

        async with anyio.create_task_group() as tg:
            for handler, sink in zip(handlers, sinks, strict=True):
                tg.start_soon(run, handler, sink)
            await settled(lambda: all(h.attached for h in handlers))
            for handler in handlers:
                await handler.send(f"pending for {handler.tag}")
            await settled(lambda: all(sink.chunks for sink in sinks))  # every stream has a write in flight
            tg.start_soon(open_gates_once_all_are_closing)
            await registry.shutdown()
            assert registry.shutting_down
            assert registry.statistics().shutting_down

        assert graceful == [True, True, True]
        for handler, sink in zip(handlers, sinks, strict=True):
            assert handler.state is SessionState.CLOSED
            assert not handler.failed
            events = parse(b"".join(sink.chunks))
            assert [e.event for e in events] == ["message", "error"]
            assert events[0].data == f"pending for {handler.tag}"
            assert json.loads(events[1].data)["code"] == ErrorCode.SERVER_SHUTDOWN
            assert events[1].retry == 500
        assert len(registry) == 3  # shutdown ends sessions; removing them is the owner's job


async def test_shutdown_of_empty_registry_and_detached_sessions() -> None:
    with anyio.fail_after(5):
        empty: SessionRegistry[Entry] = SessionRegistry()
        await empty.shutdown()
        assert empty.shutting_down

        registry: SessionRegistry[Entry] = SessionRegistry()
        handler = make_handler("d" * 32)
        registry.add(handler.session_id, Entry(handler))
        await registry.shutdown()  # no connection: nothing to drain to
        assert handler.ended
        assert handler.state is SessionState.CLOSED
