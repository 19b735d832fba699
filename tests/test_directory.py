"""The session directory and its leases against a real redis-server: register, lookup, acquire,
release, abandon, forget, stale leases, renewals, expiry, and every lease given up on leaving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import uuid4

import anyio
import pytest
from redis.asyncio import Redis

from mcp_sse_transport import SseConfig
from mcp_sse_transport.cluster import Directory, DirectoryEntry
from mcp_sse_transport.errors import FencedError
from mcp_sse_transport.redis_store import RedisEventStore

from ._redis import lease_runs_out

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


def _key(prefix: str, name: str, session_id: str = SESSION) -> str:
    return f"{prefix}{{{session_id}}}:{name}"


@asynccontextmanager
async def _directories(
    redis_url: str, prefix: str, owner_lease: float = 1.0
) -> AsyncIterator[tuple[Directory, Directory]]:
    """Two workers' directories, each on a client of its own."""
    config = SseConfig(redis_url=redis_url, redis_prefix=prefix, owner_lease=owner_lease, forward_timeout=2.0)
    clients = Redis.from_url(redis_url), Redis.from_url(redis_url)
    try:
        yield tuple(  # type: ignore[misc]
            Directory(redis, RedisEventStore(redis, prefix=prefix), config, uuid4().hex[:16]) for redis in clients
        )
    finally:
        for redis in clients:
            await redis.aclose()


async def test_a_registered_session_is_looked_up_with_its_owner(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix) as (a, b):
            assert await a.lookup(SESSION) is None
            await a.register(SESSION, "fp", "secret")
            assert a.serves(SESSION) and a.renews(SESSION) and not b.serves(SESSION)
            assert await b.lookup(SESSION) == DirectoryEntry(a.worker_id, "fp", "secret", ())
            await redis_client.hset(_key(redis_prefix, "meta"), mapping={"init": b"{1}", "initialized": b"{2}"})
            entry = await b.lookup(SESSION)
            assert entry is not None and entry.handshake == (b"{1}", b"{2}")
            lease = a.lease(SESSION)
            assert lease is not None and lease.generation == 1 and lease.valid()
            assert await redis_client.get(_key(redis_prefix, "owner")) == a.worker_id.encode()
            assert 0 < await b.lease_remaining(SESSION) <= 1.0


async def test_an_entry_without_a_resume_secret_is_not_found(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix) as (a, _):
            await redis_client.hset(_key(redis_prefix, "meta"), mapping={"fp": "fp", "g": 1})  # an older version's
            assert await a.lookup(SESSION) is None


async def test_a_session_is_acquired_only_once_its_lease_ran_out(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix, owner_lease=0.3) as (a, b):
            assert not await b.acquire(SESSION), "an unknown session is not taken"
            await a.register(SESSION, "fp", "secret")  # not entered: a renews nothing
            assert not await b.acquire(SESSION), "a holds the lease"
            await lease_runs_out(redis_client, _key(redis_prefix, "owner"))
            assert await a.lease_remaining(SESSION) == 0
            entry = await b.lookup(SESSION)
            assert entry is not None and entry.owner is None
            assert await b.acquire(SESSION)
            lease = b.lease(SESSION)
            assert lease is not None and lease.generation == 2 and b.serves(SESSION)
            assert not await a.acquire(SESSION), "b holds it now"
            entry = await a.lookup(SESSION)
            assert entry is not None and entry.owner == b.worker_id


async def test_a_released_lease_is_taken_at_once_by_another_worker(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix, owner_lease=30) as (a, b):
            await a.register(SESSION, "fp", "secret")
            lease = a.lease(SESSION)
            await a.release(SESSION)
            assert lease is not None and lease.revoked
            assert not a.serves(SESSION) and not a.renews(SESSION) and a.lease(SESSION) is None
            assert await redis_client.get(_key(redis_prefix, "owner")) is None
            assert await b.acquire(SESSION)
            await a.release(SESSION)  # holds nothing: b's lease is left alone
            assert await redis_client.get(_key(redis_prefix, "owner")) == b.worker_id.encode()


async def test_an_abandoned_takeover_gives_the_generation_back(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix, owner_lease=0.3) as (a, b):
            await a.register(SESSION, "fp", "secret")
            await lease_runs_out(redis_client, _key(redis_prefix, "owner"))
            assert await b.acquire(SESSION)
            await b.abandon(SESSION)
            assert not b.renews(SESSION)
            assert await redis_client.hget(_key(redis_prefix, "meta"), "g") == b"1"
            assert await redis_client.get(_key(redis_prefix, "owner")) is None


async def test_forget_removes_every_key_of_the_session_unless_fenced(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix, owner_lease=0.3) as (a, b):
            with pytest.raises(FencedError, match="holds no lease"):
                await a.forget(SESSION)
            await a.register(SESSION, "fp", "secret")
            await a.store.append(SESSION, None, b"{}")
            await redis_client.sadd(_key(redis_prefix, "pending"), "1")
            await redis_client.hset(_key(redis_prefix, "seen"), "1", "nonce")
            await a.forget(SESSION)
            assert not a.renews(SESSION)
            assert [key async for key in redis_client.scan_iter(match=f"{redis_prefix}*")] == []

            await a.register(OTHER, "fp", "secret")
            await lease_runs_out(redis_client, _key(redis_prefix, "owner", OTHER))
            assert await b.acquire(OTHER)
            with pytest.raises(FencedError, match="another worker holds it"):
                await a.forget(OTHER)
            assert await redis_client.exists(_key(redis_prefix, "meta", OTHER)) == 1
            entry = await b.lookup(OTHER)
            assert entry is not None and entry.owner == b.worker_id


async def test_a_stale_owner_key_naming_this_worker_is_dropped(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix) as (a, b):
            owner_key = _key(redis_prefix, "owner")
            await redis_client.set(owner_key, b.worker_id)  # another worker's: left alone
            await a.drop_stale_lease(SESSION)
            assert await redis_client.get(owner_key) == b.worker_id.encode()
            await redis_client.set(owner_key, a.worker_id)  # a's release of it failed, say
            await a.drop_stale_lease(SESSION)
            assert await redis_client.get(owner_key) is None


async def test_an_entered_directory_renews_its_leases_and_gives_them_up_on_leaving(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix, owner_lease=0.3) as (a, b):
            async with a:
                await a.register(SESSION, "fp", "secret")
                await a.register(OTHER, "fp", "secret")
                lease = a.lease(SESSION)
                assert lease is not None
                lease.valid_until = anyio.current_time()  # as if it ran out locally
                await lease.hold(bounded=False)  # returns once a renewal was granted
                assert lease.valid()
                assert await redis_client.get(_key(redis_prefix, "owner")) == a.worker_id.encode()
            assert lease.revoked and not a.renews(SESSION) and not a.renews(OTHER)
            for session_id in (SESSION, OTHER):
                assert await redis_client.get(_key(redis_prefix, "owner", session_id)) is None
                assert await b.acquire(session_id), "given up on leaving: taken at once"


async def _reported_lost(a: Directory) -> list[tuple[str, bool]]:
    """Enter ``a`` (its renewals run) until it reported one lease lost: what it reported."""
    lost: list[tuple[str, bool]] = []
    told = anyio.Event()

    def on_lost(session_id: str, gone: bool) -> None:
        lost.append((session_id, gone))
        told.set()

    a.on_lost = on_lost
    async with a:
        await told.wait()
    return lost


async def test_a_lease_another_worker_took_is_reported_lost(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix, owner_lease=0.3) as (a, b):
            await a.register(SESSION, "fp", "secret")
            await lease_runs_out(redis_client, _key(redis_prefix, "owner"))
            assert await b.acquire(SESSION)
            assert await _reported_lost(a) == [(SESSION, False)]
            assert not a.serves(SESSION) and b.serves(SESSION)


async def test_a_session_redis_lost_is_reported_gone(redis_client: Redis, redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        async with _directories(redis_url, redis_prefix, owner_lease=0.3) as (a, _):
            await a.register(SESSION, "fp", "secret")
            await redis_client.delete(_key(redis_prefix, "meta"))  # Redis lost the session
            assert await _reported_lost(a) == [(SESSION, True)]
