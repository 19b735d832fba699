"""Fenced ownership against a real redis-server: a worker whose lease passed to another worker
(its event loop frozen past the lease, here) writes nothing more to the session's log, sends
nothing more to its client, and deletes nothing of the session, which lives on at the new owner.

In one process, two :class:`Directory` objects stand for two workers; with real processes, worker
A is frozen with SIGSTOP while B takes its session over (a POST or a resume), then thawed.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from mcp_sse_transport import ErrorCode, SessionHandler, SseConfig
from mcp_sse_transport.cluster import Bus, Directory, RedisRequestLedger
from mcp_sse_transport.errors import ConnectionLostError, FencedError
from mcp_sse_transport.redis_store import RedisEventStore

from ._cluster import Worker, workers
from ._handlers import quiet_config
from ._redis import lease_runs_out
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, SseEvent
from .test_handler import RecordingSink, start
from .test_resume import start_session

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"


def _key(prefix: str, name: str, session_id: str = SESSION) -> str:
    return f"{prefix}{{{session_id}}}:{name}"


class _Worker(Directory):
    """A worker's directory, with its request ledger's fenced strike-off."""

    def __init__(self, redis: Redis, store: RedisEventStore, config: SseConfig) -> None:
        bus = Bus(redis, redis, config)
        super().__init__(redis, store, config, bus.worker_id)
        self._ledger = RedisRequestLedger(self, bus)

    async def remove_pending(self, session_id: str, *request_ids: str | int) -> None:
        await self._ledger.remove_pending(session_id, *request_ids)


def _cluster(redis: Redis, redis_url: str, prefix: str) -> _Worker:
    config = SseConfig(redis_url=redis_url, redis_prefix=prefix, owner_lease=1.0)
    return _Worker(redis, RedisEventStore(redis, prefix=prefix), config)


@asynccontextmanager
async def _workers(redis_url: str, prefix: str) -> AsyncIterator[tuple[_Worker, _Worker]]:
    """Two workers' directories, each on its own Redis client, as each process would have."""
    redis_a, redis_b = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        yield _cluster(redis_a, redis_url, prefix), _cluster(redis_b, redis_url, prefix)
    finally:
        await redis_a.aclose()
        await redis_b.aclose()


# -- in one process: two workers' directories ------------------------------------------------------


async def test_the_old_owner_can_change_nothing_once_another_worker_took_the_session(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(20):
        async with _workers(redis_url, redis_prefix) as (a, b):
            await a.register(SESSION, "fp", "secret")
            first = await a.store.append(SESSION, None, b'{"by": "a"}')
            pending = _key(redis_prefix, "pending")
            await redis_client.sadd(pending, json.dumps(1), json.dumps(2))
            assert not await b.acquire(SESSION), "a holds the lease"
            await lease_runs_out(redis_client, _key(redis_prefix, "owner"))  # a froze: no renewal
            async with b:  # b's renewals run
                await _fenced_out(a, b, redis_client, redis_prefix, first)


async def _fenced_out(a: _Worker, b: _Worker, redis_client: Redis, redis_prefix: str, first: str) -> None:
    pending = _key(redis_prefix, "pending")
    assert await b.acquire(SESSION)
    assert await redis_client.hget(_key(redis_prefix, "meta"), "g") == b"2"
    # Each time as if a's event loop stalled just after it found its lease (generation 1) valid:
    # Redis refuses every command, and a gives the lease up for lost.
    refused: list[Callable[[], Awaitable[object]]] = [
        partial(a.store.append, SESSION, None, b'{"by": "a, late"}'),
        partial(a.remove_pending, SESSION, 1),
        partial(a.forget, SESSION),
    ]
    for command in refused:
        a._take_lease(SESSION, 1, anyio.current_time())
        lease = a._leases[SESSION]
        with pytest.raises(FencedError):
            await command()
        assert lease.revoked
    a._take_lease(SESSION, 1, anyio.current_time())
    await a.release(SESSION)  # fenced quietly: nothing to report

    assert await redis_client.get(_key(redis_prefix, "owner")) == b.worker_id.encode()
    entries = await _log(redis_client, b.store.key(SESSION))
    assert [entry_id for entry_id, _ in entries] == [first], "nothing of a's after the takeover"
    assert await redis_client.smembers(pending) == {b"1", b"2"}, "no answer struck off by a"
    entry = await b.lookup(SESSION)
    assert entry is not None and entry.owner == b.worker_id and entry.secret == "secret"

    # The new owner carries on, and ends the session for good.
    await b.store.append(SESSION, None, b'{"by": "b"}')
    await b.remove_pending(SESSION, 1, 2)
    assert await redis_client.smembers(pending) == set()
    await b.forget(SESSION)
    assert [key async for key in redis_client.scan_iter(match=f"{redis_prefix}*")] == []


async def test_a_renewal_never_takes_back_a_lease_another_worker_took_since(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(20):
        async with _workers(redis_url, redis_prefix) as (a, b):
            lost: list[tuple[str, bool]] = []
            told = anyio.Event()

            def on_lost(session_id: str, gone: bool) -> None:
                lost.append((session_id, gone))
                told.set()

            a.on_lost = on_lost
            await a.register(SESSION, "fp", "secret")  # a's renewals are not running: as if frozen
            owner_key = _key(redis_prefix, "owner")
            await lease_runs_out(redis_client, owner_key)
            assert await b.acquire(SESSION)
            await b.release(SESSION)  # b handed it off: nobody holds the lease, its generation moved on
            assert await redis_client.get(owner_key) is None
            async with a:  # thawed: a's renewal loop runs
                await told.wait()
            assert lost == [(SESSION, False)]
            assert await redis_client.get(owner_key) is None, "a did not take the lease back"
            with pytest.raises(FencedError):
                await a.store.append(SESSION, None, b"late")
            assert await redis_client.exists(a.store.key(SESSION)) == 0


async def test_a_takeover_that_wrote_nothing_gives_the_session_back_to_its_owner(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(20):
        async with _workers(redis_url, redis_prefix) as (a, b):
            meta, owner_key = _key(redis_prefix, "meta"), _key(redis_prefix, "owner")
            await a.register(SESSION, "fp", "secret")  # a's renewals are not running: Redis is away, say
            await lease_runs_out(redis_client, owner_key)
            assert await b.acquire(SESSION)
            await b.abandon(SESSION)  # its takeover failed before its first write
            assert await redis_client.hget(meta, "g") == b"1" and await redis_client.get(owner_key) is None
            lease = a.lease(SESSION)
            assert lease is not None and not lease.valid()
            async with a:  # a's renewal takes its lease back: the session never moved
                await lease.hold(bounded=False)  # returns once a renewal is granted
                assert await redis_client.get(owner_key) == a.worker_id.encode()
            assert await redis_client.hget(meta, "g") == b"1"
            # A takeover that wrote gives the lease up, and keeps its generation.
            await lease_runs_out(redis_client, owner_key)
            assert await b.acquire(SESSION)
            await b.store.append(SESSION, None, b'{"by": "b"}')
            await b.abandon(SESSION)
            assert await redis_client.hget(meta, "g") == b"2" and await redis_client.get(owner_key) is None


async def test_a_lease_runs_out_locally_before_it_can_in_redis(redis_url: str, redis_prefix: str) -> None:
    """Validity is counted from before the command that took the lease was sent, less a margin:
    this worker stops writing before Redis could hand the lease to another."""
    with anyio.fail_after(20):
        async with _workers(redis_url, redis_prefix) as (a, _):
            await a.register(SESSION, "fp", "secret")
            lease = a._leases[SESSION]
            remaining_in_redis = int(await a.redis.pttl(_key(redis_prefix, "owner"))) / 1000
            assert lease.valid()
            assert lease.valid_until - lease.margin - anyio.current_time() < remaining_in_redis
            lease.valid_until = anyio.current_time()  # as after a stall: not renewed in time
            passed = anyio.Event()

            async def write() -> None:
                await lease.hold(bounded=False)  # what a write to the client awaits first
                passed.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(write)
                await anyio.wait_all_tasks_blocked()
                assert not passed.is_set(), "the write waits for a renewal"
                lease.renewed(anyio.current_time())
            assert passed.is_set()
            lease.revoke()
            with pytest.raises(FencedError):
                await lease.hold(bounded=False)


async def test_a_fenced_session_ends_its_stream_at_once_with_nothing_more_written(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(20):
        async with _workers(redis_url, redis_prefix) as (a, b):
            await a.register(SESSION, "fp", "secret")
            lease = a.lease(SESSION)
            assert lease is not None
            handler = SessionHandler(SESSION, quiet_config(), a.store, secret="secret")
            handler.guard = partial(lease.hold, bounded=False)
            sink = RecordingSink()
            async with anyio.create_task_group() as tg:
                runner = await start(tg, handler, sink)
                await handler.send(b'{"n": 1}')
                await sink.wait_for(lambda: sink.completed == 1)
                await lease_runs_out(redis_client, _key(redis_prefix, "owner"))
                assert await b.acquire(SESSION)
                lease.valid_until = anyio.current_time() + 60  # a stalled just after its check
                await handler.send(b'{"n": 2}')  # its writer's append is refused in Redis
                await runner.done.wait()
            assert runner.graceful is False and handler.failed and lease.revoked
            assert len(sink.chunks) == 1, "no final event: the client resumes at the new owner"
            with pytest.raises(ConnectionLostError):
                await handler.send(b'{"n": 3}')
            assert [body for _, body in await _log(redis_client, a.store.key(SESSION))] == [{"n": 1}]


# -- real workers: one frozen past its lease, its session taken over -------------------------------


def _tool_call(request_id: int, name: str, arguments: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if progress:
        params["_meta"] = {"progressToken": "p"}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


async def _read_until(raw: RawSseStream, answered: int) -> list[SseEvent]:
    """The events up to and including the response or error for request ``answered``."""
    events: list[SseEvent] = []
    while not events or events[-1].json().get("id") != answered:
        event = await raw.next_event()
        assert event is not None, "the stream ended early"
        if event.event == "message":
            events.append(event)
    return events


async def _log(redis: Redis, key: str) -> list[tuple[str, dict[str, Any]]]:
    """The session's Redis Stream: each entry's id, and its event's JSON."""
    raw: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(key)  # type: ignore[assignment]
    return [(entry_id.decode(), json.loads(fields[b"d"])) for entry_id, fields in raw]


def _token(event: SseEvent) -> str:
    assert event.id is not None
    return event.id.rsplit(":", 1)[1]


@pytest.mark.parametrize("takeover", ["post", "resume"])
async def test_a_frozen_owner_writes_and_sends_nothing_after_its_session_was_taken_over(
    redis_client: Redis, redis_url: str, redis_prefix: str, takeover: str
) -> None:
    with anyio.fail_after(90):
        async with workers(redis_url, redis_prefix, count=2, owner_lease=1.0) as (a, b):
            await _frozen_owner(redis_client, redis_prefix, a, b, takeover)


async def _frozen_owner(redis: Redis, prefix: str, a: Worker, b: Worker, takeover: str) -> None:
    async with httpx2.AsyncClient(base_url=a.url) as to_a, httpx2.AsyncClient(base_url=b.url) as to_b:
        async with RawSseStream.open(a.url) as on_a:
            post_url = await start_session(on_a, to_a, retry_ms=100)
            session_id = post_url.rsplit("=", 1)[1]
            owner_key, events_key = _key(prefix, "owner", session_id), _key(prefix, "events", session_id)
            a_id = await redis.get(owner_key)
            countdown = _tool_call(1, "countdown", {"steps": 100_000, "interval": 0.01}, progress=True)
            assert (await to_a.post(post_url, json=countdown)).status_code == 202
            seen = [event for _ in range(5) if (event := await on_a.next_event()) is not None]
            assert [event.json()["params"]["progress"] for event in seen] == [1, 2, 3, 4, 5]

            a.process.send_signal(signal.SIGSTOP)  # a's event loop freezes: no renewal, no write
            try:
                before = await _log(redis, events_key)  # a cannot append while frozen
                await lease_runs_out(redis, owner_key)
                resumed: list[SseEvent] = []
                if takeover == "post":
                    echo = _tool_call(2, "echo", {"text": "on b"})
                    assert (await to_b.post(post_url, json=echo)).status_code == 202
                else:
                    async with RawSseStream.open(b.url, headers={"Last-Event-ID": seen[-1].id or ""}) as on_b:
                        endpoint = await on_b.next_event()
                        assert endpoint is not None and endpoint.data == post_url
                        resumed = await _read_until(on_b, 1)
                b_id = await redis.get(owner_key)
                assert b_id is not None and b_id != a_id, "b holds the lease"
                assert await redis.hget(_key(prefix, "meta", session_id), "g") == b"2"
            finally:
                a.process.send_signal(signal.SIGCONT)

            # Thawed, a learns its lease is lost: it ends the stream, sending nothing it had not
            # stored before the freeze (bytes already on the wire may still arrive).
            tail: list[SseEvent] = []
            while (event := await on_a.next_event()) is not None:
                tail.append(event)
            assert on_a.closed or on_a.ended
            stored_before = {entry_id for entry_id, _ in before}
            assert {_token(event) for event in tail} <= stored_before, "a sent nothing new"

        if takeover == "post":  # the client resumes where a's stream ended, on b
            last = (seen + tail)[-1]
            async with RawSseStream.open(b.url, headers={"Last-Event-ID": last.id or ""}) as on_b:
                endpoint = await on_b.next_event()
                assert endpoint is not None and endpoint.data == post_url
                resumed = await _read_until(on_b, 2)
                # A POST that reaches a still goes to the session, at b (a no longer serves it).
                echo = _tool_call(3, "echo", {"text": "via a"})
                assert (await to_a.post(post_url, json=echo)).status_code == 202
                resumed += await _read_until(on_b, 3)
            received = seen + tail + resumed
        else:
            received = seen + resumed

        after = await _log(redis, events_key)
        assert after[: len(before)] == before
        added = [body for _, body in after[len(before) :]]
        assert not any(body.get("method") == "notifications/progress" for body in added), "a appended nothing"
        answers = [body for body in added if "id" in body]
        assert answers[0]["id"] == 1 and answers[0]["error"]["code"] == ErrorCode.REQUEST_INTERRUPTED
        if takeover == "post":
            assert answers[1]["id"] == 2 and answers[1]["result"]["content"][0]["text"] == "on b"
            assert answers[2]["id"] == 3 and answers[2]["result"]["content"][0]["text"] == "via a"
        # Every event exactly once, in order: what the client got is the log, after the
        # initialize response it read while opening the session.
        assert after[0][1]["id"] == 0
        assert [_token(event) for event in received] == [entry_id for entry_id, _ in after[1:]]
        # a's forget or release left b's session intact.
        assert await redis.get(owner_key) == b_id
        assert await redis.exists(_key(prefix, "meta", session_id), events_key) == 2
        assert b"session" in a.log and b"another worker" in a.log
