"""RedisEventStore against a real redis-server: tokens, ordering under concurrency, replay,
retention (count, age, expiry), failures as StoreError, and a SessionHandler resuming from it.

Every test has its own key prefix on the shared server (``redis_prefix``); tests that kill or
pause a server start one of their own (``redis_process``).
"""

from __future__ import annotations

import time
from itertools import pairwise
from uuid import uuid4

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from mcp_sse_transport import BEFORE_FIRST, EventStore, InMemoryEventStore, Replay, SessionHandler, StoredEvent
from mcp_sse_transport.errors import FencedError, StoreError, StoreUnavailableError
from mcp_sse_transport.fencing import Lease
from mcp_sse_transport.handler import session_tag
from mcp_sse_transport.ids import format_event_id, parse_event_id
from mcp_sse_transport.redis_store import RedisEventStore, _Append

from ._handlers import parse, quiet_config
from ._redis import RedisProcess
from .test_handler import RecordingSink, drop_and_resume, start

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
SECRET = "fedcba9876543210fedcba9876543210"
OTHER = "fedcba9876543210fedcba9876543210"
MAX = 2**64 - 1


def stream_id(token: str) -> tuple[int, int]:
    ms, seq = token.split("-")
    return int(ms), int(seq)


def strictly_increasing(tokens: list[str]) -> bool:
    ids = [stream_id(token) for token in tokens]
    return all(a < b for a, b in pairwise(ids))


async def wall_clock_passes(unix_ms: float) -> None:
    """Return once the wall clock is past ``unix_ms``. The age limit and Redis's expiry are
    measured on wall-clock time, so the sleep here only lets that time elapse; it synchronizes
    nothing (every other wait in these tests is on an event or a result)."""
    await anyio.sleep(max(0.0, unix_ms / 1000 - time.time()) + 0.005)
    assert time.time() * 1000 > unix_ms


async def append_all(store: RedisEventStore, session_id: str, count: int, prefix: str = "e") -> list[str]:
    return [await store.append(session_id, None, f"{prefix}{i}".encode()) for i in range(count)]


def payloads(replay: Replay | None) -> list[bytes]:
    assert replay is not None
    return [event.data for event in replay.events]


# -- construction and keys -------------------------------------------------------------------------


@pytest.mark.parametrize(("max_events", "max_age"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -1.0), (1, float("inf"))])
async def test_non_positive_limits_rejected(redis_client: Redis, max_events: int, max_age: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        RedisEventStore(redis_client, max_events=max_events, max_age=max_age)


async def test_decoding_client_rejected(redis_url: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisEventStore(client)
    finally:
        await client.aclose()


async def test_key_is_hash_tagged_by_session_and_store_is_an_event_store(redis_client: Redis) -> None:
    store = RedisEventStore(redis_client, prefix="pfx:")
    assert store.redis is redis_client
    assert store.prefix == "pfx:"
    assert store.key(SESSION) == f"pfx:{{{SESSION}}}:events"
    assert isinstance(store, EventStore)


# -- appending -------------------------------------------------------------------------------------


async def test_appends_return_increasing_tokens_and_replay_in_order(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        items: list[tuple[str | None, bytes]] = [
            (None, b"first"),
            ("custom", b"second"),
            ("message", b""),
            (None, b"\x00\xff\r\n binary \xe2\x98"),
            ("n\u00e9", "é☃".encode()),
        ]
        tokens = [await store.append(SESSION, event, data) for event, data in items]
        assert strictly_increasing(tokens)
        replay = await store.replay(SESSION, BEFORE_FIRST)
        expected = [StoredEvent(token, event, data) for token, (event, data) in zip(tokens, items, strict=True)]
        assert replay == Replay(expected, gap=False)
        # Each entry names the one before it, which tells a resume whether anything after its token was trimmed.
        raw = await redis_client.xrange(store.key(SESSION))
        assert raw is not None
        assert [fields for _, fields in raw][:2] == [
            {b"e": b"", b"d": b"first", b"p": b"0"},
            {b"e": b"custom", b"d": b"second", b"p": tokens[0].encode()},
        ]
        assert [fields[b"p"] for _, fields in raw if fields is not None] == [b"0"] + [t.encode() for t in tokens[:-1]]
        assert await store.last_token(SESSION) == tokens[-1]


async def test_tokens_round_trip_through_event_ids(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        for token in await append_all(store, SESSION, 3):
            assert parse_event_id(format_event_id(SESSION, token, SECRET)) == (SESSION, token, SECRET)


async def test_append_sets_expiry_of_max_age(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix, max_age=30.0)
        await store.append(SESSION, None, b"x")
        assert 0 < await redis_client.pttl(store.key(SESSION)) <= 30_000
        await redis_client.pexpire(store.key(SESSION), 1_000)
        await store.append(SESSION, None, b"y")  # every append renews it
        assert 1_000 < await redis_client.pttl(store.key(SESSION)) <= 30_000


async def test_idle_session_expires(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix, max_age=0.05)
        token = await store.append(SESSION, None, b"x")
        await wall_clock_passes(stream_id(token)[0] + 50 + 30)
        assert await redis_client.exists(store.key(SESSION)) == 0
        assert await store.replay(SESSION, token) is None
        assert await store.replay(SESSION, BEFORE_FIRST) == Replay([], gap=False)
        assert await store.last_token(SESSION) is None


async def test_concurrent_appends_keep_call_order_and_other_sessions_do_not_wait(
    redis_client: Redis, redis_prefix: str
) -> None:
    with anyio.fail_after(20):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        calls: list[int] = []
        tokens: dict[int, str] = {}
        completed: list[tuple[str, int]] = []

        async def append(session_id: str, n: int) -> None:
            if session_id == SESSION:
                calls.append(n)  # no await between this and the append's call
            token = await store.append(session_id, None, f"{n}".encode())
            if session_id == SESSION:
                tokens[n] = token
            completed.append((session_id, n))

        async with anyio.create_task_group() as tg:
            for n in range(50):
                tg.start_soon(append, SESSION, n)
            tg.start_soon(append, OTHER, 0)
        assert sorted(calls) == list(range(50))
        assert strictly_increasing([tokens[n] for n in calls])
        assert [n for session_id, n in completed if session_id == SESSION] == calls
        assert payloads(await store.replay(SESSION, BEFORE_FIRST)) == [f"{n}".encode() for n in calls]
        assert payloads(await store.replay(OTHER, BEFORE_FIRST)) == [b"0"]
        assert store._batch == [] and not store._sending  # nothing left queued, nobody sending


async def test_appends_whose_callers_are_cancelled_never_hold_up_the_others(redis_process: RedisProcess) -> None:
    client = Redis.from_url(redis_process.url, socket_timeout=10)
    try:
        with anyio.fail_after(20):
            store = RedisEventStore(client, prefix="cancel:")
            tokens: dict[int, str] = {}
            scopes: dict[int, anyio.CancelScope] = {}

            async def append(n: int) -> None:
                with anyio.CancelScope() as scopes[n]:
                    tokens[n] = await store.append(SESSION, None, f"{n}".encode())

            await store.append(SESSION, None, b"connected")  # the pool holds a connection
            redis_process.pause()  # the first append's round trip hangs: the others queue behind it
            async with anyio.create_task_group() as tg:
                for n in range(30):
                    tg.start_soon(append, n)
                await anyio.wait_all_tasks_blocked()
                cancelled = {*range(1, 30, 3), 29}  # waiting ones, the last one among them
                for n in {0, *cancelled}:  # and the one sending, whose round trip is shielded
                    scopes[n].cancel()
                redis_process.resume()
            assert set(tokens) == set(range(30)) - cancelled
            assert strictly_increasing([tokens[n] for n in sorted(tokens)])
            assert store._batch == [] and not store._sending
            # The sender's append was shielded, and the cancelled waiters' still went out: all 30 stored.
            assert len(payloads(await store.replay(SESSION, BEFORE_FIRST))) == 31
    finally:
        await client.aclose()


async def test_a_batch_reloads_the_script_redis_forgot(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        await store.append(SESSION, None, b"first")
        await redis_client.script_flush()  # as a restarted Redis would have
        # A batch of several goes out pipelined, where a missing script fails every append.
        batch = [
            _Append(SESSION, store.key(SESSION), [store.max_events, 60_000, b"", f"{n}".encode()]) for n in range(3)
        ]
        await store._send(batch)
        assert all(entry.failure is None for entry in batch)
        tokens = [entry.token or "" for entry in batch]
        assert strictly_increasing(tokens)
        stored = payloads(await store.replay(SESSION, BEFORE_FIRST))
        assert stored == [b"first", b"0", b"1", b"2"], "each appended once"


# -- replay ----------------------------------------------------------------------------------------


async def test_replay_after_and_until(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        t = await append_all(store, SESSION, 6)
        assert payloads(await store.replay(SESSION, t[1])) == [b"e2", b"e3", b"e4", b"e5"]
        assert payloads(await store.replay(SESSION, t[1], t[3])) == [b"e2", b"e3"]
        assert payloads(await store.replay(SESSION, BEFORE_FIRST, t[0])) == [b"e0"]
        assert payloads(await store.replay(SESSION, "0-0")) == [f"e{i}".encode() for i in range(6)]
        assert await store.replay(SESSION, t[5]) == Replay([], gap=False)
        assert await store.replay(SESSION, t[2], t[2]) == Replay([], gap=False)
        replay = await store.replay(SESSION, t[3])
        assert replay is not None and [e.token for e in replay.events] == t[4:]
        with pytest.raises(ValueError, match="until"):
            await store.replay(SESSION, t[0], "not-a-token")


async def test_replay_of_unknown_session(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        assert await store.replay(SESSION, BEFORE_FIRST) == Replay([], gap=False)
        assert await store.replay(SESSION, "1764351234567-0") is None
        token = await store.append(OTHER, None, b"theirs")
        assert await store.replay(SESSION, token) is None  # another session's token means nothing here
        assert await store.last_token(SESSION) is None


@pytest.mark.parametrize(
    "after",
    [
        "",
        "abc",
        "1",
        "-1-0",
        "1-",
        "-0",
        "1-2-3",
        "(1-0",
        "+",
        "-",
        "$",
        "*",
        " 1-0",
        "1-0 ",
        "1_0-0",
        "\u0661-\u0660",  # Arabic-Indic digits: \d matches them, Redis does not
        "9" * 21 + "-0",
        f"{2**64}-0",
        f"0-{2**64}",
    ],
)
async def test_replay_after_malformed_token_is_none(redis_client: Redis, redis_prefix: str, after: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        await store.append(SESSION, None, b"x")
        assert await store.replay(SESSION, after) is None


async def test_replay_after_future_token_is_none(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        ms, seq = stream_id(await store.append(SESSION, None, b"x"))
        for after in (f"{ms}-{seq + 1}", f"{ms + 1}-0", f"{MAX}-{MAX}"):
            assert await store.replay(SESSION, after) is None, after


# -- retention -------------------------------------------------------------------------------------


async def test_count_trimming_flags_a_gap_only_when_events_after_the_token_were_trimmed(
    redis_client: Redis, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix, max_events=3)
        t = await append_all(store, SESSION, 5)
        assert await redis_client.xlen(store.key(SESSION)) == 3  # exact MAXLEN
        assert await store.replay(SESSION, t[1]) == Replay(
            [StoredEvent(t[i], None, f"e{i}".encode()) for i in (2, 3, 4)], gap=False
        )
        replay = await store.replay(SESSION, t[0])  # e1 is gone
        assert replay is not None and replay.gap and payloads(replay) == [b"e2", b"e3", b"e4"]
        replay = await store.replay(SESSION, BEFORE_FIRST)
        assert replay is not None and replay.gap and payloads(replay) == [b"e2", b"e3", b"e4"]
        assert await store.replay(SESSION, t[4]) == Replay([], gap=False)
        assert await store.last_token(SESSION) == t[4]


async def test_age_trimming_on_replay_and_trim(redis_client: Redis, redis_prefix: str) -> None:
    """Two stores on the same keys: ``short`` ages events out after 50 ms, ``long`` keeps them
    (and keeps the key from expiring), so what each sees is decided by age alone."""
    with anyio.fail_after(10):
        long = RedisEventStore(redis_client, prefix=redis_prefix, max_age=60.0)
        short = RedisEventStore(redis_client, prefix=redis_prefix, max_age=0.05)
        a, b = await append_all(long, SESSION, 2)
        await wall_clock_passes(stream_id(b)[0] + 50 + 20)
        assert await short.replay(SESSION, BEFORE_FIRST) == Replay([], gap=True)
        assert await short.replay(SESSION, a) == Replay([], gap=True)
        assert await short.replay(SESSION, b) == Replay([], gap=False)  # still a token it issued
        assert await redis_client.xlen(long.key(SESSION)) == 0  # the replay trimmed them
        c = await long.append(SESSION, None, b"c")
        assert await long.replay(SESSION, b) == Replay([StoredEvent(c, None, b"c")], gap=False)
        assert await long.replay(SESSION, a) == Replay([StoredEvent(c, None, b"c")], gap=True)
        await wall_clock_passes(stream_id(c)[0] + 50 + 20)
        await long.trim(SESSION)  # nothing is 60 s old
        assert await redis_client.xlen(long.key(SESSION)) == 1
        await short.trim(SESSION)
        assert await redis_client.xlen(long.key(SESSION)) == 0
        assert await long.replay(SESSION, b) == Replay([], gap=True)
        assert await long.last_token(SESSION) == c
        await short.trim(OTHER)  # an unknown session: nothing to do, and nothing created
        assert await redis_client.exists(short.key(OTHER)) == 0


async def test_gap_is_exact_whichever_store_instance_appended(redis_client: Redis, redis_prefix: str) -> None:
    """Two workers' stores appending to one session in turn (a session taken over, say): each
    entry still names the one before it, so a resume knows exactly what was trimmed."""
    with anyio.fail_after(10):
        stores = [RedisEventStore(redis_client, prefix=redis_prefix, max_events=3) for _ in range(2)]
        t = [await stores[i % 2].append(SESSION, None, f"e{i}".encode()) for i in range(5)]
        for store in stores:
            assert await store.last_token(SESSION) == t[4]
            assert await store.replay(SESSION, t[1]) == Replay(
                [StoredEvent(t[i], None, f"e{i}".encode()) for i in (2, 3, 4)], gap=False
            )
            replay = await store.replay(SESSION, t[0])
            assert replay is not None and replay.gap


async def test_drop_forgets_the_session(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        token = await store.append(SESSION, None, b"x")
        await store.append(OTHER, None, b"y")
        await store.drop(SESSION)
        assert await redis_client.exists(store.key(SESSION)) == 0
        assert await store.replay(SESSION, token) is None
        assert await store.last_token(SESSION) is None
        assert payloads(await store.replay(OTHER, BEFORE_FIRST)) == [b"y"]
        await store.drop(SESSION)  # again: nothing to do


# -- property: replay is the retained suffix ---------------------------------------------------------

event_names = st.none() | st.text(min_size=1, max_size=8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    items=st.lists(st.tuples(event_names, st.binary(max_size=32)), min_size=1, max_size=30),
    max_events=st.integers(min_value=1, max_value=40),
    after_pick=st.integers(min_value=0),
    until_pick=st.none() | st.integers(min_value=0),
)
async def test_replay_is_the_retained_suffix(
    redis_client: Redis,
    redis_prefix: str,
    items: list[tuple[str | None, bytes]],
    max_events: int,
    after_pick: int,
    until_pick: int | None,
) -> None:
    with anyio.fail_after(10):
        session_id = uuid4().hex
        store = RedisEventStore(redis_client, prefix=redis_prefix, max_events=max_events)
        model = InMemoryEventStore(max_events=max_events)
        tokens = [await store.append(session_id, event, data) for event, data in items]
        model_tokens = [await model.append(session_id, event, data) for event, data in items]
        first = after_pick % (len(items) + 1)  # index of the first event after `after`
        after = BEFORE_FIRST if first == 0 else tokens[first - 1]
        last = len(items) - 1 if until_pick is None else until_pick % len(items)
        until = None if until_pick is None else tokens[last]
        replay = await store.replay(session_id, after, until)
        assert replay is not None
        retained_from = max(0, len(items) - max_events)
        expected = [StoredEvent(tokens[i], *items[i]) for i in range(max(first, retained_from), last + 1)]
        assert replay == Replay(expected, gap=first < retained_from)
        model_after = BEFORE_FIRST if first == 0 else model_tokens[first - 1]
        model_replay = await model.replay(session_id, model_after, None if until is None else model_tokens[last])
        assert model_replay is not None
        assert [(e.event, e.data) for e in replay.events] == [(e.event, e.data) for e in model_replay.events]
        assert replay.gap == model_replay.gap


# -- failures --------------------------------------------------------------------------------------


def unreachable_client(server: RedisProcess) -> Redis:
    return Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=2)


def assert_store_error(exc: StoreError, operation: str) -> None:
    assert isinstance(exc.__cause__, RedisError | OSError)
    message = str(exc)
    assert message.startswith(f"{operation} for session {session_tag(SESSION)}")
    assert SESSION not in message  # the whole id is a bearer capability


async def test_dead_server_raises_store_error_promptly(redis_process: RedisProcess) -> None:
    client = unreachable_client(redis_process)
    try:
        store = RedisEventStore(client, prefix="dead:")
        with anyio.fail_after(10):
            token = await store.append(SESSION, None, b"kept")
            redis_process.kill()
            with pytest.raises(StoreError) as append_error:
                await store.append(SESSION, None, b"lost")
            assert_store_error(append_error.value, "append")
            with pytest.raises(StoreError) as replay_error:
                await store.replay(SESSION, token)
            assert_store_error(replay_error.value, "replay")
            with pytest.raises(StoreError) as trim_error:
                await store.trim(SESSION)
            assert_store_error(trim_error.value, "trim")
            with pytest.raises(StoreError) as last_error:
                await store.last_token(SESSION)
            assert_store_error(last_error.value, "last_token")
            with pytest.raises(StoreError) as drop_error:
                await store.drop(SESSION)
            assert_store_error(drop_error.value, "drop")
            assert store._batch == [] and not store._sending
    finally:
        await client.aclose()


async def test_hung_server_raises_store_error_within_the_socket_timeout(redis_process: RedisProcess) -> None:
    client = unreachable_client(redis_process)
    try:
        store = RedisEventStore(client, prefix="hung:")
        with anyio.fail_after(10):
            await store.append(SESSION, None, b"kept")
            redis_process.pause()
            try:
                with pytest.raises(StoreError) as error:
                    await store.append(SESSION, None, b"lost")
            finally:
                redis_process.resume()
            assert_store_error(error.value, "append")
    finally:
        await client.aclose()


# -- a session handler on this store -----------------------------------------------------------------


async def test_session_handler_resume_replays_missed_events_from_redis(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        handler = SessionHandler(SESSION, quiet_config(), store, secret=SECRET)
        _, second, second_sink = await drop_and_resume(handler)
        stored = await store.replay(SESSION, BEFORE_FIRST)
        assert stored is not None and [e.data for e in stored.events] == [b"e1", b"e2", b"e3", b"e4", b"e5"]
        # Everything after the last event the client saw, exactly once, in order, with the store's ids.
        events = parse(second_sink.data)
        assert [e.data for e in events] == ["e2", "e3", "e4", "e5"]
        assert [e.id for e in events] == [format_event_id(SESSION, e.token, SECRET) for e in stored.events[1:]]
        assert second.graceful is True


async def test_session_handler_ends_when_redis_fails(redis_process: RedisProcess) -> None:
    client = unreachable_client(redis_process)
    try:
        store = RedisEventStore(client, prefix="dead:")
        handler = SessionHandler(SESSION, quiet_config(grant_timeout=0.5), store)  # how long it tries
        with anyio.fail_after(10):
            await handler.send("kept")
            await handler.flush()
            redis_process.kill()
            with pytest.raises(StoreUnavailableError):
                await handler.send("lost")  # no connection: the producer stores it itself
            assert handler.failed
            with pytest.raises(StoreUnavailableError):
                await handler.send("after")
    finally:
        await client.aclose()


async def test_session_handler_accounts_for_events_in_flight_and_sent_during_a_resume(
    redis_process: RedisProcess,
) -> None:
    """A connection drops with a write in flight; an event comes while detached, another while
    the resume stores what was waiting: every event arrives once, and the buffer's room is all
    given back (not twice, not never)."""
    client = Redis.from_url(redis_process.url, socket_timeout=10)
    try:
        with anyio.fail_after(10):
            store = RedisEventStore(client, prefix="flight:")
            handler = SessionHandler(SESSION, quiet_config(max_buffered_events=10), store)
            first_sink = RecordingSink(gated=True)
            second_sink = RecordingSink()
            async with anyio.create_task_group() as tg:
                first = await start(tg, handler, first_sink)
                for n in range(1, 6):
                    await handler.send(f"e{n}")
                await first_sink.wait_chunks(1)  # stored, then taken by a write that never completes
                handler.connection_lost()
                await first.done.wait()
                await handler.send("e6")  # while detached
                redis_process.pause()  # the resume's storing of e6 waits on Redis...
                second = await start(tg, handler, second_sink, after=BEFORE_FIRST)
                await anyio.wait_all_tasks_blocked()
                await handler.send("e7")  # ...while e7 is sent
                redis_process.resume()
                # Its data line: ids carry the session's secret, random hex that may hold "e7".
                await second_sink.wait_for(lambda: b"data: e7\r\n" in second_sink.data)
                assert handler.statistics().buffered_events == 0
                for n in range(8, 20):  # the whole buffer is usable again
                    await handler.send(f"e{n}")
                await handler.close()
                await second.done.wait()
            assert [event.data for event in parse(second_sink.data)] == [f"e{n}" for n in range(1, 20)]
    finally:
        await client.aclose()


# -- fenced appends (an owner's, conditional on its lease's generation) -----------------------------


def _fenced_store(redis_client: Redis, prefix: str) -> tuple[RedisEventStore, Lease]:
    """A store whose appends for ``SESSION`` are fenced by a lease of generation 1."""
    store = RedisEventStore(redis_client, prefix=prefix)
    lease = _lease(store, SESSION, 1)
    store.leases = {SESSION: lease}
    return store, lease


def _lease(store: RedisEventStore, session_id: str, generation: int, worker_id: str = "worker-a") -> Lease:
    prefix = store.prefix
    return Lease(
        session_id,
        generation,
        worker_id=worker_id,
        owner_key=f"{prefix}{{{session_id}}}:owner",
        meta_key=f"{prefix}{{{session_id}}}:meta",
        term=30.0,
        sent=time.monotonic(),
        timeout=5.0,
    )


async def _enter(redis_client: Redis, lease: Lease, generation: int, owner: str | None) -> None:
    """The session's directory as the cluster keeps it: its generation, and who holds the lease."""
    await redis_client.hset(lease.meta_key, "g", generation)
    if owner is None:
        await redis_client.delete(lease.owner_key)
    else:
        await redis_client.set(lease.owner_key, owner)


async def test_a_fenced_append_goes_through_only_for_the_current_generation(
    redis_client: Redis, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        store, lease = _fenced_store(redis_client, redis_prefix)
        await _enter(redis_client, lease, 1, "worker-a")
        first = await store.append(SESSION, None, b"mine")
        await _enter(redis_client, lease, 1, None)  # the lease ran out, nobody took it: no other writer
        second = await store.append(SESSION, None, b"still mine")
        assert strictly_increasing([first, second])
        await _enter(redis_client, lease, 2, "worker-b")  # another worker took the session over
        with pytest.raises(FencedError) as fenced:
            await store.append(SESSION, None, b"too late")
        assert not fenced.value.transient and isinstance(fenced.value, StoreError)
        assert lease.revoked, "the lease is given up for lost"
        await _enter(redis_client, lease, 1, "worker-b")  # the same generation, another holder
        store.leases = {SESSION: _lease(store, SESSION, 1)}
        with pytest.raises(FencedError):
            await store.append(SESSION, None, b"not mine")
        assert payloads(await store.replay(SESSION, BEFORE_FIRST)) == [b"mine", b"still mine"]


async def test_a_fenced_append_is_refused_without_a_round_trip_once_its_lease_is_lost(
    redis_client: Redis, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        store.leases = {}
        with pytest.raises(FencedError, match="holds no lease"):
            await store.append(SESSION, None, b"unleased")
        lease = _lease(store, SESSION, 1)
        store.leases = {SESSION: lease}
        await _enter(redis_client, lease, 1, "worker-a")
        lease.revoke()
        with pytest.raises(FencedError, match="lost"):
            await store.append(SESSION, None, b"revoked")
        assert await store.last_token(SESSION) is None, "nothing reached the log"


async def test_a_session_gone_from_redis_fails_a_fenced_append_as_a_store_error(
    redis_client: Redis, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        store, lease = _fenced_store(redis_client, redis_prefix)
        with pytest.raises(StoreError, match="no longer knows") as gone:
            await store.append(SESSION, None, b"orphan")
        assert not isinstance(gone.value, FencedError) and not gone.value.transient and not lease.revoked
        assert await store.last_token(SESSION) is None


async def test_a_batch_fences_each_session_by_its_own_lease_in_one_round_trip(
    redis_client: Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with anyio.fail_after(10):
        store = RedisEventStore(redis_client, prefix=redis_prefix)
        mine, theirs = _lease(store, SESSION, 3), _lease(store, OTHER, 1)
        store.leases = {SESSION: mine, OTHER: theirs}
        await _enter(redis_client, mine, 3, "worker-a")
        await _enter(redis_client, theirs, 2, "worker-b")  # OTHER was taken over
        batch = [
            _Append(session_id, store.key(session_id), [store.max_events, 60_000, b"", f"{n}".encode()], lease)
            for n, (session_id, lease) in enumerate([(SESSION, mine), (OTHER, theirs), (SESSION, mine)])
        ]
        pipelines: list[bool] = []
        original = redis_client.pipeline

        def counting(transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
            pipelines.append(transaction)
            return original(transaction, shard_hint)

        monkeypatch.setattr(redis_client, "pipeline", counting)
        await store._send(batch)
        monkeypatch.undo()
        assert pipelines == [False], "one pipeline, one round trip, for the whole batch"
        assert [entry.failure is None for entry in batch] == [True, False, True]
        assert isinstance(batch[1].failure, FencedError)
        assert payloads(await store.replay(SESSION, BEFORE_FIRST)) == [b"0", b"2"]
        assert await store.last_token(OTHER) is None


async def test_an_append_waits_while_its_lease_lapsed_locally_and_goes_out_once_renewed(
    redis_client: Redis, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        store, lease = _fenced_store(redis_client, redis_prefix)
        await _enter(redis_client, lease, 1, "worker-a")
        lease.valid_until = time.monotonic()  # as after an event loop stalled past the lease
        appended: list[str] = []

        async def append() -> None:
            appended.append(await store.append(SESSION, None, b"after the renewal"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(append)
            await anyio.wait_all_tasks_blocked()
            assert appended == [] and await store.last_token(SESSION) is None, "held back"
            lease.renewed(time.monotonic())
        assert payloads(await store.replay(SESSION, BEFORE_FIRST)) == [b"after the renewal"]
        lease.valid_until = time.monotonic()
        lease.timeout = 0.05  # no renewal comes: given up for lost, nothing sent
        with pytest.raises(FencedError, match="not renewed"):
            await store.append(SESSION, None, b"never")
        assert lease.revoked
