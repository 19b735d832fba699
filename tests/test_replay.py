"""Resuming a SessionHandler's stream: the replay writer (the store's events, encoded as writes,
in pages) and a resume through the handler. Helpers are test_handler.py's."""

from __future__ import annotations

import json

import anyio
import pytest

from mcp_sse_transport import (
    BEFORE_FIRST,
    ErrorCode,
    InMemoryEventStore,
    Replay,
    SessionHandler,
    SessionState,
    ids,
    replay,
)
from mcp_sse_transport import handler as handler_module
from mcp_sse_transport.handler import REPLAY_PAGE
from mcp_sse_transport.stream_state import WRITE_CHUNK

from ._handlers import parse
from .test_handler import (
    SECRET,
    SESSION,
    RecordingSink,
    config,
    drop_and_resume,
    message,
    new_handler,
    start,
)

pytestmark = pytest.mark.anyio


PREFIX = f"{SESSION}.{SECRET}:"


async def _chunks(store: InMemoryEventStore, after: str, until: str | None = None) -> list[tuple[bytes, int, str]]:
    return [chunk async for chunk in replay.replay_chunks(store, SESSION, PREFIX, after, until)]


# -- the replay writer ---------------------------------------------------------------------------


def test_the_replay_writer_is_importable_from_the_handler_as_before() -> None:
    assert handler_module.replay_chunks is replay.replay_chunks
    assert handler_module.REPLAY_PAGE == replay.REPLAY_PAGE == 500
    assert handler_module.session_tag is ids.session_tag
    assert {"REPLAY_PAGE", "Sink", "replay_chunks", "session_tag"} <= set(handler_module.__all__)


async def test_replay_chunks_encodes_the_stored_events_after_a_token_up_to_another() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        for n in range(1, 5):
            await store.append(SESSION, "message" if n != 3 else None, f"e{n}".encode())
        assert await _chunks(store, "1", "3") == [(message(2, "e2") + message(3, "e3", None), 2, "3")]
        assert await _chunks(store, "4") == []  # nothing after the newest: no write at all
        assert replay.encode_stored(b"e1", "custom", PREFIX.encode(), "9") == message(9, "e1", "custom")


async def test_replay_chunks_splits_writes_at_about_the_write_chunk() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        payload = "x" * (WRITE_CHUNK // 2)
        for _ in range(3):
            await store.append(SESSION, "message", payload.encode())
        chunks = await _chunks(store, BEFORE_FIRST)
        assert [(events, token) for _, events, token in chunks] == [(2, "2"), (1, "3")]
        assert b"".join(chunk for chunk, _, _ in chunks) == b"".join(message(n, payload) for n in (1, 2, 3))


async def test_replay_chunks_puts_a_gap_first_as_a_resume_gap_error() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore(max_events=2)
        for n in range(1, 5):
            await store.append(SESSION, "message", f"e{n}".encode())  # e1 and e2 are trimmed
        ((chunk, events, token),) = await _chunks(store, "1")
        gap, *rest = parse(chunk)
        assert (gap.event, json.loads(gap.data)["code"]) == ("error", ErrorCode.RESUME_GAP)
        assert [event.data for event in rest] == ["e3", "e4"]
        assert (events, token) == (3, "4")  # the gap's error event counts as one
        ((lost, _, _),) = await _chunks(store, "99")  # a log that cannot replay the token at all
        assert json.loads(parse(lost)[0].data)["code"] == ErrorCode.RESUME_GAP


# -- resuming through the handler ------------------------------------------------------------------


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


# -- RAW -------------------------------------------------------------------------------------------


def test_raw_data_is_written_as_it_is_without_an_id() -> None:
    data = b"event: message\r\nid: the-sdks-own\r\ndata: {}\r\n\r\n"
    assert replay.RAW == ""
    assert replay.encode_stored(data, replay.RAW, PREFIX.encode(), "9") == data
    unnamed = replay.encode_stored(b"x", None, PREFIX.encode(), "9")
    assert unnamed == message(9, "x", None), "an event without a name is not RAW: it gets its id"
    assert unnamed != b"x"


async def test_raw_events_go_to_the_connection_and_are_replayed_unchanged() -> None:
    raw = [b": comment\r\n\r\n", b"data: one\r\n\r\n", b"event: message\r\ndata: two\r\n\r\n"]
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        handler = SessionHandler(SESSION, config(), store, secret=SECRET)
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            for chunk in raw:
                await handler.send(chunk, event=replay.RAW)
            await handler.send("tracked")
            await handler.close()
            await runner.done.wait()
        assert sink.data == b"".join(raw) + message(4, "tracked"), "RAW data still takes its token"
        ((chunk, events, token),) = await _chunks(store, BEFORE_FIRST)
        assert chunk == sink.data
        assert (events, token) == (4, "4")
