"""store: the EventStore protocol, the in-memory replay log, and append_riding_out (retrying a
failed append without storing anything twice, against a real redis-server where it fails)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence

import anyio
import pytest
from redis.asyncio import Redis

from mcp_sse_transport import SessionHandler, SseConfig
from mcp_sse_transport import store as store_module
from mcp_sse_transport.errors import FencedError, StoreError
from mcp_sse_transport.redis_store import RedisEventStore
from mcp_sse_transport.store import (
    BEFORE_FIRST,
    EventStore,
    InMemoryEventStore,
    Replay,
    StoredEvent,
    Unstored,
    append_riding_out,
)

from ._handlers import parse, quiet_config
from ._redis import RedisProcess
from .test_handler import RecordingSink, start
from .test_redis_store import unreachable_client

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


class Clock:
    """The store's ``clock``, moved by the test: age is measured on it, not on the machine's."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def payloads(replay: Replay | None) -> list[bytes]:
    assert replay is not None
    return [event.data for event in replay.events]


async def append_all(store: InMemoryEventStore, session_id: str, count: int, prefix: str = "e") -> list[str]:
    return [await store.append(session_id, None, f"{prefix}{i}".encode()) for i in range(count)]


def test_exports() -> None:
    assert set(store_module.__all__) == {
        "BEFORE_FIRST",
        "EventStore",
        "InMemoryEventStore",
        "Replay",
        "StoredEvent",
        "Unstored",
        "append_riding_out",
    }


def test_before_first_is_zero() -> None:
    assert BEFORE_FIRST == "0"


# -- StoredEvent, Replay ----------------------------------------------------------------------------


def test_stored_event_and_replay_are_frozen_values() -> None:
    event = StoredEvent("1", "message", b"x")
    assert event == StoredEvent("1", "message", b"x")
    assert event != StoredEvent("1", None, b"x")
    replay = Replay([event], gap=False)
    assert replay == Replay([StoredEvent("1", "message", b"x")], gap=False)
    assert replay != Replay([event], gap=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.token = "2"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        replay.gap = True  # type: ignore[misc]


# -- the EventStore protocol ------------------------------------------------------------------------


class _WithoutDrop:
    async def append(self, session_id: str, event: str | None, data: bytes) -> str:
        return "1"

    async def replay(
        self, session_id: str, after: str, until: str | None = None, *, limit: int | None = None
    ) -> Replay | None:
        return None

    async def trim(self, session_id: str) -> None:
        pass


def test_event_store_protocol_is_checked_at_runtime() -> None:
    assert isinstance(InMemoryEventStore(), EventStore)
    assert not isinstance(object(), EventStore)
    assert not isinstance(_WithoutDrop(), EventStore), "drop is part of the protocol"


# -- InMemoryEventStore: construction ---------------------------------------------------------------


def test_in_memory_defaults_are_sse_configs_replay_log() -> None:
    store = InMemoryEventStore()
    config = SseConfig()
    assert (store.max_events, store.max_bytes, store.max_age) == (2000, 8 * 1024 * 1024, 300.0)
    assert (store.max_events, store.max_bytes, store.max_age) == (
        config.replay_max_events,
        config.replay_max_bytes,
        config.replay_max_age,
    )
    assert (store.max_events, store.max_bytes) == (2 * config.max_buffered_events, 2 * config.max_buffered_bytes)
    assert len(store) == 0


@pytest.mark.parametrize(
    "limits",
    [
        {"max_events": 0},
        {"max_events": -1},
        {"max_bytes": 0},
        {"max_bytes": -1},
        {"max_age": 0.0},
        {"max_age": -1.0},
    ],
)
def test_non_positive_limits_rejected(limits: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        InMemoryEventStore(**limits)  # type: ignore[arg-type]


# -- InMemoryEventStore: appends --------------------------------------------------------------------


async def test_tokens_are_decimal_sequence_numbers_from_one_per_session() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        assert await append_all(store, SESSION, 3) == ["1", "2", "3"]
        assert await append_all(store, OTHER, 2) == ["1", "2"]
        assert await store.append(SESSION, None, b"x") == "4"
        assert len(store) == 2


async def test_append_nowait_and_append_share_one_sequence_and_log() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        assert store.append_nowait(SESSION, "message", b"a") == "1"
        assert await store.append(SESSION, "error", b"b") == "2"
        assert store.append_nowait(SESSION, None, b"c") == "3"
        assert await store.replay(SESSION, BEFORE_FIRST) == Replay(
            [StoredEvent("1", "message", b"a"), StoredEvent("2", "error", b"b"), StoredEvent("3", None, b"c")],
            gap=False,
        )


# -- InMemoryEventStore: replay ---------------------------------------------------------------------


async def test_replay_after_a_token_returns_the_later_events_oldest_first() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        t = await append_all(store, SESSION, 5)
        assert payloads(await store.replay(SESSION, t[1])) == [b"e2", b"e3", b"e4"]
        assert await store.replay(SESSION, t[4]) == Replay([], gap=False)


async def test_replay_until_and_limit() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        t = await append_all(store, SESSION, 6)
        assert payloads(await store.replay(SESSION, BEFORE_FIRST, t[0])) == [b"e0"]
        assert payloads(await store.replay(SESSION, t[1], t[3])) == [b"e2", b"e3"]
        assert payloads(await store.replay(SESSION, t[1], limit=2)) == [b"e2", b"e3"]
        assert payloads(await store.replay(SESSION, t[1], t[2], limit=5)) == [b"e2"]
        assert payloads(await store.replay(SESSION, t[0], limit=0)) == []
        assert payloads(await store.replay(SESSION, t[3], t[1])) == []  # until before after: nothing


async def test_a_replay_read_in_pieces_is_the_whole_replay() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        await append_all(store, SESSION, 10)
        after, pieces = BEFORE_FIRST, list[list[bytes]]()
        while (piece := await store.replay(SESSION, after, limit=3)) is not None and piece.events:
            pieces.append([event.data for event in piece.events])
            after = piece.events[-1].token
        assert [len(piece) for piece in pieces] == [3, 3, 3, 1]
        assert [data for piece in pieces for data in piece] == payloads(await store.replay(SESSION, BEFORE_FIRST))


async def test_replay_of_an_unknown_session() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        assert await store.replay(SESSION, BEFORE_FIRST) == Replay([], gap=False)
        assert await store.replay(SESSION, "1") is None
        assert len(store) == 0, "a replay creates no log"


@pytest.mark.parametrize(
    "after", ["", "x", "-1", "+1", "1.0", " 1", "1 ", "0x1", "1" * 21, "1-0", "\u00b2", "\u0661", "\uff11"]
)
async def test_replay_after_a_malformed_token_is_none(after: str) -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        await append_all(store, SESSION, 3)
        assert await store.replay(SESSION, after) is None


@pytest.mark.parametrize("until", ["x", "-1", "\u0661", "1" * 21])
async def test_replay_until_a_malformed_token_is_none(until: str) -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        await append_all(store, SESSION, 3)
        assert await store.replay(SESSION, "1", until=until) is None


async def test_replay_after_a_token_never_issued_is_none() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        await append_all(store, SESSION, 3)
        assert await store.replay(SESSION, "4") is None
        assert await store.replay(SESSION, "9" * 20) is None


async def test_replay_never_returns_another_sessions_events() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        await store.append(SESSION, None, b"mine")
        await store.append(OTHER, None, b"theirs")
        await store.append(OTHER, None, b"theirs too")
        assert payloads(await store.replay(SESSION, BEFORE_FIRST)) == [b"mine"]
        assert payloads(await store.replay(OTHER, "1")) == [b"theirs too"]


# -- InMemoryEventStore: retention ------------------------------------------------------------------


async def test_count_trimming_flags_a_gap_only_when_events_after_the_token_were_trimmed() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore(max_events=3)
        t = await append_all(store, SESSION, 5)
        assert await store.replay(SESSION, BEFORE_FIRST) == Replay(
            [StoredEvent(t[i], None, f"e{i}".encode()) for i in (2, 3, 4)], gap=True
        )
        assert await store.replay(SESSION, t[0]) == Replay(
            [StoredEvent(t[i], None, f"e{i}".encode()) for i in (2, 3, 4)], gap=True
        )
        assert await store.replay(SESSION, t[1]) == Replay(
            [StoredEvent(t[i], None, f"e{i}".encode()) for i in (2, 3, 4)], gap=False
        )


async def test_byte_trimming_keeps_the_newest_events_within_max_bytes() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore(max_bytes=10)
        for data in (b"aaaa", b"bbbb", b"cccc"):
            await store.append(SESSION, None, data)
        assert payloads(await store.replay(SESSION, "1")) == [b"bbbb", b"cccc"]
        await store.append(SESSION, None, b"dd")  # 4 + 4 + 2 bytes: exactly the limit
        assert payloads(await store.replay(SESSION, "1")) == [b"bbbb", b"cccc", b"dd"]


async def test_an_event_larger_than_max_bytes_is_not_kept() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore(max_bytes=10)
        before = await store.append(SESSION, None, b"small")
        token = await store.append(SESSION, None, b"x" * 11)
        assert int(token) == int(before) + 1
        assert await store.replay(SESSION, before) == Replay([], gap=True)
        assert await store.replay(SESSION, token) == Replay([], gap=False)


async def test_age_trimming_keeps_an_event_exactly_max_age_old_and_drops_older() -> None:
    with anyio.fail_after(5):
        clock = Clock()
        store = InMemoryEventStore(max_age=10.0, clock=clock)
        first = await store.append(SESSION, None, b"old")
        clock.now += 5
        await store.append(SESSION, None, b"newer")
        clock.now += 5  # the first is exactly max_age old
        assert payloads(await store.replay(SESSION, BEFORE_FIRST)) == [b"old", b"newer"]
        clock.now += 0.5
        assert await store.replay(SESSION, BEFORE_FIRST) == Replay([StoredEvent("2", None, b"newer")], gap=True)
        assert await store.replay(SESSION, first) == Replay([StoredEvent("2", None, b"newer")], gap=False)


async def test_trim_applies_the_age_limit_now() -> None:
    """What ``trim`` dropped stays dropped when the clock is read again: the clock stepped back
    would make the events young again if only a later replay applied the limit."""
    with anyio.fail_after(5):
        clock = Clock()
        store = InMemoryEventStore(max_age=10.0, clock=clock)
        await append_all(store, SESSION, 2)
        start = clock.now
        clock.now = start + 11
        await store.trim(SESSION)
        clock.now = start
        assert await store.replay(SESSION, BEFORE_FIRST) == Replay([], gap=True)


async def test_a_log_aged_out_completely_keeps_its_tokens() -> None:
    with anyio.fail_after(5):
        clock = Clock()
        store = InMemoryEventStore(max_age=10.0, clock=clock)
        t = await append_all(store, SESSION, 2)
        clock.now += 11
        await store.trim(SESSION)
        assert await store.replay(SESSION, t[1]) == Replay([], gap=False), "nothing after the newest was lost"
        assert await store.replay(SESSION, "3") is None
        assert await store.append(SESSION, None, b"next") == "3"


async def test_trim_of_an_unknown_session_creates_nothing() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        await store.trim(SESSION)
        assert len(store) == 0


async def test_drop_forgets_the_session_and_only_it() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        t = await append_all(store, SESSION, 3)
        await store.append(OTHER, None, b"y")
        await store.drop(SESSION)
        assert len(store) == 1
        assert await store.replay(SESSION, t[0]) is None
        assert await store.replay(SESSION, BEFORE_FIRST) == Replay([], gap=False)
        assert payloads(await store.replay(OTHER, BEFORE_FIRST)) == [b"y"]
        assert await store.append(SESSION, None, b"anew") == "1", "a new log"
        await store.drop("never there")  # nothing to forget: fine
        assert len(store) == 2


# -- Unstored -----------------------------------------------------------------------------------------


def test_unstored_is_an_event_store() -> None:
    assert isinstance(Unstored(), EventStore)


async def test_unstored_tokens_count_up_from_one_across_append_and_append_nowait() -> None:
    with anyio.fail_after(5):
        store = Unstored()
        assert store.append_nowait(SESSION, "message", b"a") == "1"
        assert await store.append(SESSION, None, b"b") == "2"
        assert store.append_nowait(SESSION, "message", b"c") == "3"


async def test_unstored_keeps_nothing_and_refuses_every_replay() -> None:
    with anyio.fail_after(5):
        store = Unstored()
        token = await store.append(SESSION, "message", b"a")
        assert await store.replay(SESSION, BEFORE_FIRST) is None
        assert await store.replay(SESSION, token) is None
        assert await store.replay(SESSION, BEFORE_FIRST, token, limit=10) is None
        assert await store.replay(OTHER, BEFORE_FIRST) is None
        await store.trim(SESSION)
        await store.drop(SESSION)
        await store.drop(OTHER)
        assert store.append_nowait(SESSION, None, b"b") == "2", "a drop forgets nothing: there is nothing"


async def test_a_handler_over_unstored_streams_its_events_with_ids_but_cannot_replay_them() -> None:
    with anyio.fail_after(5):
        handler = SessionHandler(SESSION, quiet_config(), Unstored(), secret="s" * 32)
        sink = RecordingSink()
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            await handler.send("e1")
            await handler.send("e2")
            await sink.wait_chunks(1)
            await handler.release()
            await runner.done.wait()
            resumed = RecordingSink()
            second = await start(tg, handler, resumed, after="1")
            await handler.close()
            await second.done.wait()
        assert parse(sink.data)[0].id == f"{SESSION}.{'s' * 32}:1"
        (gap,) = parse(resumed.data)
        assert gap.event == "error", "nothing to replay: the resume starts with a gap"


# -- append_riding_out ------------------------------------------------------------------------------


async def test_riding_out_appends_one_by_one_to_a_store_without_append_many() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        assert not hasattr(store, "append_many")
        before = await store.append(SESSION, None, b"first")
        batch: list[tuple[str | None, bytes]] = [("message", b"a"), (None, b"b"), ("error", b"c")]
        tokens = await append_riding_out(store, SESSION, batch, after=before, within=5)
        assert tokens == ["2", "3", "4"]
        replay = await store.replay(SESSION, before)
        assert replay is not None
        assert [(e.token, e.event, e.data) for e in replay.events] == [
            ("2", "message", b"a"),
            ("3", None, b"b"),
            ("4", "error", b"c"),
        ]


async def test_riding_out_an_empty_batch_stores_nothing() -> None:
    with anyio.fail_after(5):
        store = InMemoryEventStore()
        assert await append_riding_out(store, SESSION, [], after=None, within=5) == []
        assert len(store) == 0


async def test_riding_out_uses_append_many_in_one_call(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        counting = _FailingOnce(store)
        counting.failed = True  # never fails: counts the calls
        batch: list[tuple[str | None, bytes]] = [(None, f"e{n}".encode()) for n in range(4)]
        tokens = await append_riding_out(counting, SESSION, batch, after=None, within=5)
        assert counting.calls == 1
        stored = await store.replay(SESSION, BEFORE_FIRST)
        assert stored is not None
        assert tokens == [e.token for e in stored.events]
        assert [e.data for e in stored.events] == [b"e0", b"e1", b"e2", b"e3"]


async def test_a_permanent_failure_is_raised_at_once_without_a_retry(
    redis_client: Redis, redis_prefix: str, retrying: _Retrying
) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        store.leases = {}  # a fenced store holding no lease for the session: refused, never sent
        with pytest.raises(FencedError) as refused:
            await append_riding_out(store, SESSION, [(None, b"x")], after=None, within=30)
        assert not refused.value.transient
        assert not retrying.seen.is_set(), "no retry"
        assert await store.last_token(SESSION) is None


async def test_within_zero_raises_the_first_transient_failure_without_a_retry(
    redis_process: RedisProcess, retrying: _Retrying
) -> None:
    client = unreachable_client(redis_process)
    try:
        with anyio.fail_after(10):
            store = RedisEventStore(client, prefix="zero:")
            redis_process.kill()
            with pytest.raises(StoreError) as failed:
                await append_riding_out(store, SESSION, [(None, b"x")], after=None, within=0)
            assert failed.value.transient
            assert not retrying.seen.is_set(), "no retry"
    finally:
        await client.aclose()


# -- append_riding_out against a failing Redis (moved from test_redis_store.py) ---------------------


class _Retrying(logging.Handler):
    """Sets ``seen`` when the store reports a failure it will try again."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "trying again" in record.getMessage():
            self.seen.set()


@pytest.fixture
def retrying() -> Iterator[_Retrying]:
    handler = _Retrying()
    logger = logging.getLogger("mcp_sse_transport")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_a_stalled_store_is_ridden_out_and_nothing_is_stored_twice(
    redis_process: RedisProcess, retrying: _Retrying
) -> None:
    """Redis stops answering with a batch in flight (its reply is lost, though Redis runs it once
    it wakes): the batch is tried again, and what arrived is read back, not appended twice."""
    client = Redis.from_url(redis_process.url, socket_connect_timeout=0.3, socket_timeout=0.3)
    try:
        with anyio.fail_after(20):
            store = RedisEventStore(client, prefix="stall:")
            first = await append_riding_out(store, SESSION, [(None, b"a"), (None, b"b")], after=None, within=5)
            batch = [("message", f"e{n}".encode()) for n in range(5)]
            async with anyio.create_task_group() as tg:
                tokens: list[str] = []

                async def append() -> None:
                    tokens.extend(await append_riding_out(store, SESSION, batch, after=first[-1], within=10))

                redis_process.pause()
                tg.start_soon(append)
                await retrying.seen.wait()
                redis_process.resume()
            stored = await store.replay(SESSION, BEFORE_FIRST)
            assert stored is not None
            assert [(e.event, e.data) for e in stored.events] == [(None, b"a"), (None, b"b"), *batch]
            assert tokens == [e.token for e in stored.events[2:]]
    finally:
        await client.aclose()


async def test_a_store_down_longer_than_the_grace_fails_with_the_last_error(redis_process: RedisProcess) -> None:
    client = unreachable_client(redis_process)
    try:
        with anyio.fail_after(10):
            store = RedisEventStore(client, prefix="down:")
            redis_process.kill()
            with pytest.raises(StoreError) as failed:
                await append_riding_out(store, SESSION, [(None, b"x")], after=None, within=0.5)
            assert failed.value.transient
    finally:
        await client.aclose()


async def test_a_log_holding_events_its_session_did_not_append_is_not_tried_again(
    redis_client: Redis, redis_prefix: str
) -> None:
    """After a failure, what arrived is read back; a log that does not match (another writer)
    is a failure no retry can mend."""
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        await store.append(SESSION, None, b"someone else's")
        failing = _FailingOnce(store)
        with pytest.raises(StoreError, match="did not append") as refused:
            await append_riding_out(failing, SESSION, [(None, b"mine")], after=None, within=5)
        assert not refused.value.transient


async def test_a_log_gone_since_the_failure_is_not_tried_again(redis_client: Redis, redis_prefix: str) -> None:
    """After a failure, what arrived is read back; a log that no longer exists (Redis lost it)
    cannot come back, so the append fails at once, not after ``within``."""
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        before = await store.append(SESSION, None, b"kept")
        await store.drop(SESSION)
        failing = _FailingOnce(store)
        with pytest.raises(StoreError, match="is gone") as refused:
            await append_riding_out(failing, SESSION, [(None, b"mine")], after=before, within=5)
        assert not refused.value.transient
        assert failing.calls == 1, "no append tried again"


class _FailingOnce:
    """A store whose first ``append_many`` fails before sending anything (a refused connection)."""

    def __init__(self, store: RedisEventStore) -> None:
        self._store = store
        self.failed = False
        self.calls = 0

    async def append(self, session_id: str, event: str | None, data: bytes) -> str:
        return (await self.append_many(session_id, [(event, data)]))[0]

    async def append_many(self, session_id: str, events: Sequence[tuple[str | None, bytes]]) -> list[str]:
        self.calls += 1
        if not self.failed:
            self.failed = True
            raise StoreError("refused")
        return await self._store.append_many(session_id, events)

    async def replay(
        self, session_id: str, after: str, until: str | None = None, *, limit: int | None = None
    ) -> Replay | None:
        return await self._store.replay(session_id, after, until, limit=limit)

    async def trim(self, session_id: str) -> None:
        await self._store.trim(session_id)

    async def drop(self, session_id: str) -> None:
        await self._store.drop(session_id)
