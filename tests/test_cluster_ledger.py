"""The request ledger's records in Redis, against a real redis-server: a request id accepted once
per session, an undelivered attempt's record undone or reclaimed, the pending bound, and
answers struck off only under the current lease."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import anyio
import pytest
from redis.asyncio import Redis

from mcp_sse_transport import SseConfig
from mcp_sse_transport.cluster import Bus, Directory, RedisRequestLedger
from mcp_sse_transport.errors import FencedError
from mcp_sse_transport.redis_store import RedisEventStore

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"


@asynccontextmanager
async def _ledger(redis_url: str, prefix: str, **options: Any) -> AsyncIterator[RedisRequestLedger]:
    config = SseConfig(redis_url=redis_url, redis_prefix=prefix, **options)
    redis = Redis.from_url(redis_url)
    try:
        directory = Directory(redis, RedisEventStore(redis, prefix=prefix), config, uuid4().hex[:16])
        yield RedisRequestLedger(directory, Bus(redis, redis, config))
    finally:
        await redis.aclose()


async def test_a_request_id_is_accepted_once_and_a_retry_of_the_same_attempt_is_harmless(
    redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _ledger(redis_url, redis_prefix) as ledger:
            assert await ledger.accept_request(SESSION, 1, "n1") == "new"
            assert await ledger.accept_request(SESSION, 1, "n1") == "new", "the same attempt, sent again"
            assert await ledger.accept_request(SESSION, 1, "n2") == "seen"
            assert await ledger.accept_request(SESSION, "1", "n3") == "new", "a string id is another id"
            assert set(await ledger.pending(SESSION)) == {1, "1"}


async def test_an_undelivered_attempt_is_undone_or_reclaimed(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        async with _ledger(redis_url, redis_prefix) as ledger:
            assert await ledger.accept_request(SESSION, 7, "n1") == "new"
            assert await ledger.accept_request(SESSION, 7, "n2", reclaim=("n1",)) == "new"
            assert not await ledger.unaccept_request(SESSION, 7, "n1"), "taken over by n2 since"
            assert await ledger.unaccept_request(SESSION, 7, "n2")
            assert await ledger.pending(SESSION) == []
            assert await ledger.accept_request(SESSION, 7, "n3") == "new"


async def test_past_the_pending_bound_nothing_is_recorded(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        async with _ledger(redis_url, redis_prefix, replay_max_events=2, max_buffered_events=2) as ledger:
            assert ledger.max_pending == 2
            assert await ledger.accept_request(SESSION, 1, "n1") == "new"
            assert await ledger.accept_request(SESSION, 2, "n2") == "new"
            assert await ledger.accept_request(SESSION, 3, "n3") == "full"
            assert await ledger.pending(SESSION) == [1, 2]


async def test_answers_are_struck_off_only_under_the_current_lease(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _ledger(redis_url, redis_prefix) as ledger:
            with pytest.raises(FencedError, match="holds no lease"):
                await ledger.remove_pending(SESSION, 1)
            await ledger.directory.register(SESSION, "fp", "secret")
            for n in (1, 2, 3):
                await ledger.accept_request(SESSION, n, f"n{n}")
            await ledger.remove_pending(SESSION, 1, 3)
            assert await ledger.pending(SESSION) == [2]
            lease = ledger.directory.lease(SESSION)
            assert lease is not None and lease.wrote
            await redis_client.hset(f"{redis_prefix}{{{SESSION}}}:meta", "g", 5)  # another worker's lease since
            with pytest.raises(FencedError, match="another worker holds it"):
                await ledger.remove_pending(SESSION, 2)
            assert lease.revoked and await ledger.pending(SESSION) == [2]


async def test_the_handshake_is_kept_for_a_takeover(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        async with _ledger(redis_url, redis_prefix) as ledger:
            await ledger.directory.register(SESSION, "fp", "secret")
            await ledger.record_handshake(SESSION, "init", b'{"id":0}')
            await ledger.record_handshake(SESSION, "initialized", b'{"method":"initialized"}')
            entry = await ledger.directory.lookup(SESSION)
            assert entry is not None and entry.handshake == (b'{"id":0}', b'{"method":"initialized"}')
