"""The Redis backplane (``cluster.backplane.RedisBackplane``) against a real redis-server, with a
real session host and no HTTP: what it is built with, when it refuses requests, a session
registered, served, forgotten and handed off, and a lost lease ending the session's stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import anyio
import pytest
from redis.asyncio import Redis
from starlette.types import Message

from mcp_sse_transport import ErrorCode, SseConfig
from mcp_sse_transport._asgi import stream_session
from mcp_sse_transport.claims import RedisClaimSequence
from mcp_sse_transport.cluster import RedisBackplane, RedisRequestLedger
from mcp_sse_transport.host import SessionHost
from mcp_sse_transport.redis_store import RedisEventStore
from mcp_sse_transport.session import Session
from mcp_sse_transport.store import EventStore

from .test_resume import streaming_server

pytestmark = pytest.mark.anyio


def worker_config(redis_url: str, prefix: str, **overrides: Any) -> SseConfig:
    values: dict[str, Any] = {"owner_lease": 30.0, "forward_timeout": 2.0, **overrides}
    return SseConfig(redis_url=redis_url, redis_prefix=prefix, **values)


@asynccontextmanager
async def running_worker(
    redis_url: str,
    prefix: str,
    host_class: type[SessionHost] = SessionHost,
    event_store: EventStore | None = None,
    **overrides: Any,
) -> AsyncIterator[tuple[RedisBackplane, SessionHost]]:
    """A worker without a front end: an entered Redis backplane and the session host bound to it."""
    config = worker_config(redis_url, prefix, **overrides)
    backplane = RedisBackplane(config, event_store, streaming_server())
    host = host_class(config, backplane)
    async with backplane:
        yield backplane, host


@asynccontextmanager
async def open_session(host: SessionHost) -> AsyncIterator[Session]:
    """A new session registered on ``host`` (no server runs it), its read stream closed afterwards."""
    session, read_stream = await host.open(uuid4().hex, "", None)
    try:
        yield session
    finally:
        read_stream.close()


async def keys_of(redis: Redis, prefix: str, session_id: str) -> list[str]:
    """The names (``meta``, ``owner``, ...) of the session's keys in Redis, sorted."""
    keys = [key.decode() async for key in redis.scan_iter(match=f"{prefix}{{{session_id}}}:*")]
    return sorted(key.rsplit(":", 1)[1] for key in keys)


async def test_built_from_a_config_its_store_ledger_and_claims_are_the_redis_ones(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    backplane = RedisBackplane(worker_config(redis_url, redis_prefix), None, streaming_server())
    try:
        assert isinstance(backplane.store, RedisEventStore) and backplane.store.prefix == redis_prefix
        assert isinstance(backplane.ledger, RedisRequestLedger)
        assert isinstance(backplane.claims, RedisClaimSequence)
        with anyio.fail_after(10):
            session_id = uuid4().hex
            assert await backplane.claims.next(session_id) == 0, "a session Redis does not know"
            await redis_client.hset(f"{redis_prefix}{{{session_id}}}:meta", "fp", "")
            assert [await backplane.claims.next(session_id) for _ in range(2)] == [1, 2]
            assert await redis_client.get(f"{redis_prefix}{{{session_id}}}:claims") == b"2"
    finally:
        await backplane.__aexit__(None, None, None)  # never entered: its clients are closed all the same


async def test_check_running_raises_until_it_is_entered_and_once_it_left(redis_url: str, redis_prefix: str) -> None:
    backplane = RedisBackplane(worker_config(redis_url, redis_prefix), None, streaming_server())
    with pytest.raises(RuntimeError, match="async with"):
        backplane.check_running()
    with anyio.fail_after(10):
        async with backplane:
            backplane.check_running()
    with pytest.raises(RuntimeError, match="async with"):
        backplane.check_running()


async def test_a_registered_session_is_served_here_only_and_fenced_by_its_lease(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    with anyio.fail_after(10):
        async with (
            running_worker(redis_url, redis_prefix) as (a, host),
            running_worker(redis_url, redis_prefix) as (b, _),
        ):
            async with open_session(host) as session:  # host.open registers it with the backplane
                session_id = session.session_id
                assert a.serves(session_id) and not b.serves(session_id)
                owner = await redis_client.get(f"{redis_prefix}{{{session_id}}}:owner")
                assert owner == a._bus.worker_id.encode()
                assert session.lease is not None and session.lease is a._directory.lease(session_id)
                assert session.handler.guard is not None


async def test_forget_deletes_every_key_of_the_session(redis_url: str, redis_prefix: str, redis_client: Redis) -> None:
    with anyio.fail_after(10):
        async with running_worker(redis_url, redis_prefix) as (backplane, host), open_session(host) as session:
            session_id = session.session_id
            await backplane.store.append(session_id, "message", b"{}")
            assert await backplane._ledger.accept_request(session_id, 1, "nonce") == "new"
            assert await backplane.claims.next(session_id) == 1
            assert await keys_of(redis_client, redis_prefix, session_id) == [
                "claims",
                "events",
                "meta",
                "owner",
                "pending",
                "seen",
            ]
            await backplane.forget(session)
            assert await keys_of(redis_client, redis_prefix, session_id) == []
            assert not backplane.serves(session_id)


async def test_forget_of_a_handed_off_session_only_gives_its_lease_up(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    with anyio.fail_after(10):
        async with (
            running_worker(redis_url, redis_prefix) as (a, host),
            running_worker(redis_url, redis_prefix) as (b, _),
        ):
            async with open_session(host) as session:
                session_id = session.session_id
                await a.store.append(session_id, "message", b"{}")
                session.handed_off = True
                await a.forget(session)
                assert await keys_of(redis_client, redis_prefix, session_id) == ["events", "meta"]
                assert not a.serves(session_id)
                assert await b._directory.acquire(session_id), "another worker carries it on at once"


async def test_hand_off_gives_the_lease_up_for_another_worker_to_take_at_once(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    with anyio.fail_after(10):
        async with (
            running_worker(redis_url, redis_prefix) as (a, host),
            running_worker(redis_url, redis_prefix) as (b, _),
        ):
            async with open_session(host) as session:
                session_id = session.session_id
                lease = session.lease
                assert await b._directory.lease_remaining(session_id) > 0
                assert not await b._directory.acquire(session_id), "a holds it"
                await a.hand_off(session_id)
                assert lease is not None and lease.revoked and not a.serves(session_id)
                assert await b._directory.lease_remaining(session_id) == 0
                assert await b._directory.acquire(session_id)
                assert b.serves(session_id)
                owner = await redis_client.get(f"{redis_prefix}{{{session_id}}}:owner")
                assert owner == b._bus.worker_id.encode()


async def _stream_while(session: Session, end: Any) -> bytes:
    """Serve the session's stream to an ASGI ``send`` while ``end()`` ends it; the body sent."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("not reached")

    attachment = session.handler.attach()
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            lambda: stream_session(session.handler, {"type": "http"}, receive, send, b"", attachment=attachment)
        )
        end()
    assert sent[0]["status"] == 200
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}, "the stream ended"
    return b"".join(message.get("body", b"") for message in sent)


async def test_a_session_redis_lost_ends_its_stream_with_store_unavailable(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        async with running_worker(redis_url, redis_prefix) as (backplane, host), open_session(host) as session:
            backplane._on_lost(uuid4().hex, True)  # a session this worker does not hold: nothing to do
            body = await _stream_while(session, lambda: backplane._on_lost(session.session_id, True))
            assert session.handler.guard is None, "the fence guards nothing any more"
            assert not session.handed_off
    assert b"event: error" in body
    error = body.split(b"event: error", 1)[1]
    assert str(int(ErrorCode.STORE_UNAVAILABLE)).encode() in error
    assert b"Session state was lost from Redis; the session ends" in error


async def test_a_session_another_worker_took_is_aborted_as_handed_off(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        async with running_worker(redis_url, redis_prefix) as (backplane, host), open_session(host) as session:
            body = await _stream_while(session, lambda: backplane._on_lost(session.session_id, False))
            assert session.handed_off, "its state in Redis is the new owner's: not forgotten here"
            assert session.handler.failed and session.handler.ended
            assert session.handler.guard is not None
    assert b"event: error" not in body, "no error: the client's resume finds the session where it lives now"
