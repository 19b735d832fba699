"""A worker's Redis clients and its event store (``cluster.connect``): the URL, the timeouts and
the retry policy of each client, checked on the clients themselves and, for the retries, against
a real redis-server behind a proxy that loses one reply (the command ran; the client cannot tell)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from mcp_sse_transport import InMemoryEventStore, SseConfig
from mcp_sse_transport.cluster.connect import connect
from mcp_sse_transport.redis_store import RedisEventStore

from ._redis_proxy import Command, RedisProxy

pytestmark = pytest.mark.anyio


def _config(url: str, prefix: str = "test-connect:", **overrides: Any) -> SseConfig:
    return SseConfig(redis_url=url, redis_prefix=prefix, **overrides)


@asynccontextmanager
async def _connected(config: SseConfig) -> AsyncIterator[tuple[Redis, RedisEventStore]]:
    redis, store = connect(config, None)
    try:
        yield redis, store
    finally:
        await redis.aclose()
        await store.redis.aclose()


def _incr_of(key: str) -> Callable[[Command], bool]:
    """Matches redis-py's ``INCR`` of ``key`` (sent as ``INCRBY key 1``)."""

    def matches(command: Command) -> bool:
        return len(command) > 1 and command[0].upper() == b"INCRBY" and command[1] == key.encode()

    return matches


async def test_both_clients_reach_the_configured_url_with_the_timeouts_of_a_worker() -> None:
    config = _config("redis://127.0.0.1:6399/3", forward_timeout=2.5)
    async with _connected(config) as (redis, store):
        assert store.redis is not redis, "the store has a client of its own"
        for client in (redis, store.redis):
            kwargs = client.connection_pool.connection_kwargs
            assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6399, 3)
            assert kwargs["socket_connect_timeout"] == 1.0
            assert kwargs["socket_timeout"] == 2.5, "a command waits at most forward_timeout"
            assert kwargs["health_check_interval"] == 30


async def test_the_general_client_retries_a_connection_error_once_and_never_a_timeout() -> None:
    async with _connected(_config("redis://127.0.0.1:6399/0")) as (redis, store):
        retry = redis.get_retry()
        assert retry is not None and retry._retries == 1
        assert retry._supported_errors == (RedisConnectionError,)
        store_retry = store.redis.get_retry()
        assert store_retry is not None and store_retry._retries == 0


async def test_the_store_it_makes_has_the_configs_prefix_and_bounds() -> None:
    config = _config("redis://127.0.0.1:6399/0", "my-prefix:", replay_max_events=1234, replay_max_age=45.0)
    async with _connected(config) as (_, store):
        assert isinstance(store, RedisEventStore)
        assert (store.prefix, store.max_events, store.max_age) == ("my-prefix:", 1234, 45.0)
        assert store.key("s") == "my-prefix:{s}:events"


async def test_a_redis_store_passed_in_is_kept_and_another_store_refused() -> None:
    config = _config("redis://127.0.0.1:6399/0")
    own = Redis.from_url("redis://127.0.0.1:6399/0")
    try:
        passed = RedisEventStore(own, prefix="elsewhere:")
        redis, store = connect(config, passed)
        try:
            assert store is passed and store.redis is own and store.prefix == "elsewhere:"
            assert redis is not own
        finally:
            await redis.aclose()
        with pytest.raises(ValueError, match="must be a RedisEventStore"):
            connect(config, InMemoryEventStore())
    finally:
        await own.aclose()


async def test_a_lost_reply_is_sent_again_once_by_the_general_client_and_never_by_the_stores(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    """INCR shows how many times a command ran: the general client's lost reply is sent again
    (it ran twice, and the caller gets the second reply), the store's is not (it ran once, and
    the caller gets the connection error)."""
    general_key, store_key = f"{redis_prefix}general", f"{redis_prefix}store"
    proxy = RedisProxy(redis_url)
    with anyio.fail_after(20):
        async with proxy.running() as proxied, _connected(_config(proxied, redis_prefix)) as (redis, store):
            lost = proxy.swallow(_incr_of(general_key))
            assert await redis.incr(general_key) == 2
            assert lost.done.is_set()
            assert await redis_client.get(general_key) == b"2"

            proxy.swallow(_incr_of(store_key))
            with pytest.raises(RedisConnectionError):
                await store.redis.incr(store_key)
            assert await redis_client.get(store_key) == b"1", "ran once: never sent again"


async def test_the_general_client_gives_up_after_its_one_retry(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    key = f"{redis_prefix}{uuid4().hex[:8]}"
    proxy = RedisProxy(redis_url)
    with anyio.fail_after(20):
        async with proxy.running() as proxied, _connected(_config(proxied, redis_prefix)) as (redis, _):
            lost = proxy.swallow(_incr_of(key), times=3)
            with pytest.raises(RedisConnectionError):
                await redis.incr(key)
            assert len(lost.swallowed) == 2, "sent twice: the first time and one retry"
            assert await redis_client.get(key) == b"2"
