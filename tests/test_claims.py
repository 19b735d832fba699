"""claims: the order of a session's resumes, a process's counter or one per session in a real Redis."""

from __future__ import annotations

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from mcp_sse_transport.claims import ClaimSequence, LocalClaimSequence, RedisClaimSequence
from mcp_sse_transport.errors import StoreError
from mcp_sse_transport.ids import session_tag

from ._redis import RedisProcess

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


async def known(redis_client: Redis, prefix: str, session_id: str) -> None:
    """The session as the cluster's directory knows it: its meta hash exists."""
    await redis_client.hset(f"{prefix}{{{session_id}}}:meta", "g", 1)


# -- LocalClaimSequence -----------------------------------------------------------------------------


async def test_local_sequence_counts_from_one() -> None:
    with anyio.fail_after(5):
        sequence = LocalClaimSequence()
        assert [await sequence.next(SESSION) for _ in range(3)] == [1, 2, 3]


async def test_local_sequence_is_one_counter_for_every_session() -> None:
    with anyio.fail_after(5):
        sequence = LocalClaimSequence()
        drawn = [await sequence.next(SESSION), await sequence.next(OTHER), await sequence.next(SESSION)]
        assert drawn == [1, 2, 3]


async def test_local_sequences_are_independent() -> None:
    with anyio.fail_after(5):
        first, second = LocalClaimSequence(), LocalClaimSequence()
        await first.next(SESSION)
        await first.next(SESSION)
        assert await second.next(SESSION) == 1


async def test_local_sequence_concurrent_draws_are_distinct() -> None:
    with anyio.fail_after(5):
        sequence: ClaimSequence = LocalClaimSequence()
        drawn: list[int] = []

        async def draw() -> None:
            drawn.append(await sequence.next(SESSION))

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(draw)
        assert sorted(drawn) == list(range(1, 101))


def test_local_sequence_has_no_instance_dict() -> None:
    with pytest.raises(AttributeError):
        LocalClaimSequence().extra = 1  # type: ignore[attr-defined]


# -- RedisClaimSequence -----------------------------------------------------------------------------


async def test_redis_key_is_hash_tagged_by_session(redis_client: Redis) -> None:
    sequence = RedisClaimSequence(redis_client, "deploy:", keep=30)
    assert sequence.key(SESSION) == f"deploy:{{{SESSION}}}:claims"


async def test_redis_sequence_counts_from_one_per_session(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        sequence: ClaimSequence = RedisClaimSequence(redis_client, redis_prefix, keep=30)
        await known(redis_client, redis_prefix, SESSION)
        await known(redis_client, redis_prefix, OTHER)
        assert [await sequence.next(SESSION) for _ in range(3)] == [1, 2, 3]
        assert await sequence.next(OTHER) == 1
        assert await sequence.next(SESSION) == 4


async def test_an_unknown_session_draws_zero_and_makes_no_key(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        sequence = RedisClaimSequence(redis_client, redis_prefix, keep=30)
        assert await sequence.next(SESSION) == 0
        assert await sequence.next(SESSION) == 0
        assert await redis_client.exists(sequence.key(SESSION)) == 0
        await known(redis_client, redis_prefix, OTHER)  # another session known: not this one
        assert await sequence.next(SESSION) == 0


async def test_a_session_gone_from_the_directory_draws_zero_again(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        sequence = RedisClaimSequence(redis_client, redis_prefix, keep=30)
        await known(redis_client, redis_prefix, SESSION)
        assert await sequence.next(SESSION) == 1
        await redis_client.delete(f"{redis_prefix}{{{SESSION}}}:meta")
        assert await sequence.next(SESSION) == 0


async def test_every_worker_shares_one_order(redis_url: str, redis_client: Redis, redis_prefix: str) -> None:
    other_client = Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        with anyio.fail_after(10):
            a = RedisClaimSequence(redis_client, redis_prefix, keep=30)
            b = RedisClaimSequence(other_client, redis_prefix, keep=30)
            await known(redis_client, redis_prefix, SESSION)
            assert [await a.next(SESSION), await b.next(SESSION), await a.next(SESSION)] == [1, 2, 3]
    finally:
        await other_client.aclose()


async def test_prefixes_keep_deployments_apart(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        ours = RedisClaimSequence(redis_client, redis_prefix, keep=30)
        theirs = RedisClaimSequence(redis_client, f"{redis_prefix}other:", keep=30)
        await known(redis_client, redis_prefix, SESSION)
        await known(redis_client, f"{redis_prefix}other:", SESSION)
        assert await ours.next(SESSION) == 1
        assert await ours.next(SESSION) == 2
        assert await theirs.next(SESSION) == 1


async def test_concurrent_draws_are_distinct(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        sequence = RedisClaimSequence(redis_client, redis_prefix, keep=30)
        await known(redis_client, redis_prefix, SESSION)
        drawn: list[int] = []

        async def draw() -> None:
            drawn.append(await sequence.next(SESSION))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(draw)
        assert sorted(drawn) == list(range(1, 51))


async def test_each_draw_sets_the_counters_expiry_to_keep(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        sequence = RedisClaimSequence(redis_client, redis_prefix, keep=2.5)
        await known(redis_client, redis_prefix, SESSION)
        await sequence.next(SESSION)
        assert 0 < await redis_client.pttl(sequence.key(SESSION)) <= 2500
        await redis_client.pexpire(sequence.key(SESSION), 100_000)
        await sequence.next(SESSION)  # the session's last resume: its expiry counts from here
        assert 0 < await redis_client.pttl(sequence.key(SESSION)) <= 2500


async def test_a_keep_under_a_millisecond_still_expires(redis_client: Redis, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        sequence = RedisClaimSequence(redis_client, redis_prefix, keep=0)
        await known(redis_client, redis_prefix, SESSION)
        assert await sequence.next(SESSION) >= 1
        # A key of 1 ms: gone, or about to be; never kept forever (-1).
        assert await redis_client.pttl(sequence.key(SESSION)) in {-2, 0, 1}


async def test_a_dead_server_raises_a_store_error_naming_only_the_session_tag(
    redis_process: RedisProcess,
) -> None:
    client = Redis.from_url(redis_process.url, socket_connect_timeout=1, socket_timeout=2)
    try:
        with anyio.fail_after(10):
            sequence = RedisClaimSequence(client, "dead:", keep=30)
            await client.hset(f"dead:{{{SESSION}}}:meta", "g", 1)
            assert await sequence.next(SESSION) == 1
            redis_process.kill()
            with pytest.raises(StoreError) as failed:
                await sequence.next(SESSION)
            assert isinstance(failed.value.__cause__, RedisError | OSError)
            assert failed.value.transient
            message = str(failed.value)
            assert message.startswith(f"taking a resume's place in line for session {session_tag(SESSION)} failed")
            assert SESSION not in message
    finally:
        await client.aclose()


async def test_a_script_redis_forgot_is_loaded_again(redis_process: RedisProcess) -> None:
    """``SCRIPT FLUSH`` (or a failover to a replica that never saw the script): the next draw
    loads it again and the count goes on."""
    client = Redis.from_url(redis_process.url, socket_connect_timeout=1, socket_timeout=2)
    try:
        with anyio.fail_after(10):
            sequence = RedisClaimSequence(client, "flush:", keep=30)
            await client.hset(f"flush:{{{SESSION}}}:meta", "g", 1)
            assert await sequence.next(SESSION) == 1
            await client.script_flush()
            assert await sequence.next(SESSION) == 2
    finally:
        await client.aclose()
