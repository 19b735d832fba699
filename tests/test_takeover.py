"""Takeovers (``cluster.takeover.Takeovers``) on real Redis backplanes in one process, with real
session hosts and no HTTP: ``max_sessions``, a lease another worker holds, waiting for a takeover
in progress, the unanswered requests' errors stored in pages, and the fence on a session's writes."""

from __future__ import annotations

import json
from functools import partial
from typing import Any
from uuid import uuid4

import anyio
import anyio.abc
import pytest
from redis.asyncio import Redis

from mcp_sse_transport import ErrorCode
from mcp_sse_transport._sdk import ReadStream, Server, SessionMessage
from mcp_sse_transport.cluster import RedisBackplane
from mcp_sse_transport.cluster.takeover import _INTERRUPTED_PAGE
from mcp_sse_transport.errors import FencedError
from mcp_sse_transport.host import SessionHost
from mcp_sse_transport.redis_store import RedisEventStore
from mcp_sse_transport.session import Session, SessionsFull
from mcp_sse_transport.store import BEFORE_FIRST

from .test_cluster_backplane import open_session, running_worker

pytestmark = pytest.mark.anyio


async def _left_by_its_owner(owner: RedisBackplane) -> str:
    """A session in Redis whose owner gave its lease up: anyone may take it over at once."""
    session_id = uuid4().hex
    await owner._directory.register(session_id, "", uuid4().hex)
    await owner._directory.release(session_id)
    return session_id


async def _owner(redis: Redis, prefix: str, session_id: str) -> bytes | None:
    owner = await redis.get(f"{prefix}{{{session_id}}}:owner")
    assert owner is None or isinstance(owner, bytes)
    return owner


class _HeldHost(SessionHost):
    """A session host whose run of a session taken over starts only once ``release`` is set:
    the takeover stays in progress until then (``entered`` tells it got there)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def run(
        self,
        session: Session,
        read_stream: ReadStream[SessionMessage | Exception],
        server: Server[Any],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        self.entered.set()
        await self.release.wait()
        await super().run(session, read_stream, server, task_status=task_status)


async def test_adopt_past_max_sessions_is_refused_and_takes_no_lease(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    with anyio.fail_after(10):
        async with (
            running_worker(redis_url, redis_prefix) as (a, _),
            running_worker(redis_url, redis_prefix, max_sessions=1) as (b, host),
        ):
            session_id = await _left_by_its_owner(a)
            takeovers = b._bound.takeovers
            async with open_session(host):  # the one session b may have
                with pytest.raises(SessionsFull):
                    await takeovers.adopt(session_id)
            assert await _owner(redis_client, redis_prefix, session_id) is None, "nobody holds it"
            assert not b.serves(session_id) and host.sessions.get(session_id) is None
            assert await takeovers.local(session_id) is None, "no takeover left in progress"


async def test_adopt_of_a_session_whose_lease_another_worker_holds_returns_none(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    with anyio.fail_after(10):
        async with (
            running_worker(redis_url, redis_prefix) as (a, a_host),
            running_worker(redis_url, redis_prefix, max_sessions=1) as (b, b_host),
            open_session(a_host) as session,
        ):
            session_id = session.session_id
            assert await b._bound.takeovers.adopt(session_id) is None
            assert not b.serves(session_id) and b_host.sessions.get(session_id) is None
            assert a.serves(session_id)
            assert await _owner(redis_client, redis_prefix, session_id) == a._bus.worker_id.encode()
            async with open_session(b_host):  # its slot was given back: b may still open its one session
                pass


async def test_local_waits_for_a_takeover_in_progress_and_returns_its_session(
    redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with (
            running_worker(redis_url, redis_prefix) as (a, _),
            running_worker(redis_url, redis_prefix, host_class=_HeldHost) as (b, host),
        ):
            assert isinstance(host, _HeldHost)
            session_id = await _left_by_its_owner(a)
            takeovers = b._bound.takeovers
            adopted: list[Session | None] = []

            async def adopt() -> None:
                adopted.append(await takeovers.adopt(session_id))

            async def release() -> None:
                host.release.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(adopt)
                await host.entered.wait()  # the lease taken, the session made, not yet registered
                assert host.sessions.get(session_id) is None
                # ``release`` runs only once this task waits: inside local(), on the takeover.
                tg.start_soon(release)
                found = await takeovers.local(session_id)
            assert found is not None and adopted == [found]
            assert host.sessions.get(session_id) is found and b.serves(session_id)


class _PagedStore(RedisEventStore):
    """The Redis event store, noting how many events each ``append_many`` call carries."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        super().__init__(redis, prefix=prefix)
        self.pages: list[int] = []

    async def append_many(self, session_id: str, events: Any) -> list[str]:
        self.pages.append(len(events))
        return await super().append_many(session_id, events)


async def test_interrupt_unanswered_stores_one_interrupted_error_per_pending_request_in_pages(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    count = 2 * _INTERRUPTED_PAGE + 201
    request_ids: list[str | int] = [*range(1, count), "last"]
    store_client = Redis.from_url(redis_url)
    store = _PagedStore(store_client, redis_prefix)
    try:
        with anyio.fail_after(30):
            async with running_worker(redis_url, redis_prefix, event_store=store) as (backplane, _):
                session_id = uuid4().hex
                await backplane._directory.register(session_id, "", uuid4().hex)  # as taken over: its lease
                pending = f"{redis_prefix}{{{session_id}}}:pending"
                await redis_client.sadd(pending, *(json.dumps(request_id) for request_id in request_ids))

                unanswered = await backplane._bound.takeovers._interrupt_unanswered(session_id)

                assert sorted(map(str, unanswered)) == sorted(map(str, request_ids))
                assert store.pages == [_INTERRUPTED_PAGE, _INTERRUPTED_PAGE, 201]
                replay = await store.replay(session_id, BEFORE_FIRST)
                assert await redis_client.scard(pending) == count, "struck off only by the caller, once stored"
    finally:
        await store_client.aclose()
    assert replay is not None and not replay.gap
    answered: list[str | int] = []
    for event in replay.events:
        assert event.event == "message"
        body = json.loads(event.data)
        assert body["jsonrpc"] == "2.0" and body["error"]["code"] == ErrorCode.REQUEST_INTERRUPTED
        answered.append(body["id"])
    assert answered == unanswered, "one error each, in the order returned"


async def test_fence_binds_the_handlers_guard_to_the_sessions_lease(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        async with running_worker(redis_url, redis_prefix, owner_lease=0.6) as (backplane, host):
            session_id = uuid4().hex
            await backplane._directory.register(session_id, "", uuid4().hex)
            session, read_stream = host.create(session_id, "")
            try:
                backplane._bound.takeovers.fence(session)
                lease = backplane._directory.lease(session_id)
                assert lease is not None and session.lease is lease
                guard = session.handler.guard
                assert isinstance(guard, partial) and guard.func == lease.hold and guard.keywords == {"bounded": False}
                await guard()  # valid: at once
                lease.valid_until = anyio.current_time()  # as if it ran out locally
                await guard()  # waits, unbounded, for the directory's next renewal
                assert lease.valid()
                await backplane._directory.release(session_id)
                with pytest.raises(FencedError, match="lease is lost"):
                    await guard()
            finally:
                read_stream.close()
