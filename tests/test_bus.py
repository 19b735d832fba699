"""The worker's channel against a real redis-server: typed messages published and dispatched by
type, nobody listening reported, malformed messages dropped, and the channel subscribed again
after its connection is killed or Redis restarts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import pytest
from redis.asyncio import Redis

from mcp_sse_transport import SseConfig
from mcp_sse_transport.cluster import Bus
from mcp_sse_transport.cluster.connect import connect
from mcp_sse_transport.cluster.messages import PROTOCOL_VERSION, Ack, Chunk, Detach, Posted, encode

from ._redis import RedisProcess

pytestmark = pytest.mark.anyio


def _config(url: str, prefix: str, owner_lease: float = 3.0) -> SseConfig:
    return SseConfig(redis_url=url, redis_prefix=prefix, owner_lease=owner_lease, forward_timeout=1.0)


@asynccontextmanager
async def _bus(url: str, prefix: str, owner_lease: float = 3.0) -> AsyncIterator[Bus]:
    """A running bus on clients of its own, as a worker makes them, closed afterwards."""
    config = _config(url, prefix, owner_lease)
    redis, store = connect(config, None)
    try:
        async with Bus(redis, store.redis, config) as bus:
            yield bus
    finally:
        await redis.aclose()
        await store.redis.aclose()


class _Inbox:
    """What a handler received, with an event per arrival to wait on."""

    def __init__(self) -> None:
        self.received: list[object] = []
        self._arrived = anyio.Event()

    def __call__(self, message: object) -> None:
        self.received.append(message)
        self._arrived.set()

    async def wait_for(self, count: int) -> list[object]:
        while len(self.received) < count:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return self.received


class _LogEvent(logging.Handler):
    """Sets an event when a record containing ``text`` is logged (in the event loop's thread)."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.event = anyio.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if self.text in message:
            self.event.set()

    def rearm(self) -> None:
        self.event = anyio.Event()


@contextmanager
def _logged(text: str) -> Iterator[_LogEvent]:
    handler = _LogEvent(text)
    logger = logging.getLogger("mcp_sse_transport")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


async def test_a_published_message_reaches_the_handler_of_its_type(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        async with _bus(redis_url, redis_prefix) as a, _bus(redis_url, redis_prefix) as b:
            posted, chunks = _Inbox(), _Inbox()
            b.on(Posted, posted)
            b.on(Chunk, chunks)
            assert await a.publish(b.worker_id, Posted(reply_to="r1", status=202)) == 1
            assert await a.publish(b.worker_id, Chunk(conn="c", seq=1, body=b"data: x\n\n")) == 1
            assert await a.publish(b.worker_id, Ack(conn="c", seq=1)) == 1  # no handler: ignored
            assert await a.publish(b.worker_id, Posted(reply_to="r2", status=404)) == 1
            assert await posted.wait_for(2) == [Posted(reply_to="r1", status=202), Posted(reply_to="r2", status=404)]
            assert chunks.received == [Chunk(conn="c", seq=1, body=b"data: x\n\n")]
            assert a.worker_id != b.worker_id and len(a.worker_id) == 16


async def test_a_message_for_a_worker_nobody_listens_for_is_reported_unreceived(
    redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _bus(redis_url, redis_prefix, owner_lease=0.3) as a:
            assert await a.publish("gone-worker", Detach(conn="c")) == 0
            assert not await a.listening("gone-worker")
            assert await a.listening(a.worker_id)


async def test_a_malformed_message_is_logged_and_dropped_and_the_channel_goes_on(
    redis_client: Redis, redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10), _logged("cannot read") as log:
        async with _bus(redis_url, redis_prefix) as b:
            inbox = _Inbox()
            b.on(Detach, inbox)
            channel = b.channel(b.worker_id)
            malformed = [
                b"not json",
                b'{"t":"detach","c":"c"}',  # no version
                b'{"v":%d,"t":"detach","c":"c"}' % (PROTOCOL_VERSION + 1),  # another release's
                b'{"v":%d,"t":"nonsense"}' % PROTOCOL_VERSION,
                b'{"v":%d,"t":"detach","c":7}' % PROTOCOL_VERSION,
            ]
            for data in malformed:
                assert await redis_client.publish(channel, data) == 1
            assert await redis_client.publish(channel, encode(Detach(conn="after"))) == 1
            assert await inbox.wait_for(1) == [Detach(conn="after")]
            dropped = [message for message in log.messages if "cannot read" in message]
            assert len(dropped) == len(malformed)


async def test_a_handler_failure_in_spawned_work_is_logged_and_the_bus_goes_on(
    redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10), _logged("failed") as log:
        bus = Bus(Redis.from_url(redis_url), Redis.from_url(redis_url), _config(redis_url, redis_prefix))
        with pytest.raises(RuntimeError, match="not running"):
            bus.check_running()

        async def fail() -> None:
            raise ValueError("boom")

        try:
            async with bus:
                bus.spawn("a doomed task", fail)
                await log.event.wait()
                assert any("a doomed task failed" in message for message in log.messages)
                bus.check_running()
            with pytest.raises(RuntimeError):
                bus.spawn("after leaving", fail)
        finally:
            await bus.redis.aclose()
            await bus._once.aclose()


async def test_the_channel_is_subscribed_again_after_its_connection_is_killed(
    redis_process: RedisProcess, redis_prefix: str
) -> None:
    """A message sent while the receiver subscribes again is sent again until it is received:
    within :data:`RESUBSCRIBE_WINDOW`, nothing is lost."""
    admin = Redis.from_url(redis_process.url)
    try:
        with anyio.fail_after(20):
            async with _bus(redis_process.url, redis_prefix) as a, _bus(redis_process.url, redis_prefix) as b:
                inbox = _Inbox()
                b.on(Posted, inbox)
                assert int(await admin.client_kill_filter(_type="pubsub")) == 2
                assert await a.publish(b.worker_id, Posted(reply_to="r", status=202)) == 1
                assert await b.publish(a.worker_id, Detach(conn="back")) == 1
                assert await inbox.wait_for(1) == [Posted(reply_to="r", status=202)]
    finally:
        await admin.aclose()


async def test_the_channel_is_subscribed_again_after_redis_restarts(
    redis_process: RedisProcess, redis_prefix: str
) -> None:
    with anyio.fail_after(30):
        async with _bus(redis_process.url, redis_prefix) as a, _bus(redis_process.url, redis_prefix) as b:
            inbox = _Inbox()
            b.on(Posted, inbox)
            redis_process.stop()
            redis_process.start()  # same port; every subscription is gone
            assert await a.publish(b.worker_id, Posted(reply_to="r", status=202)) == 1
            assert await inbox.wait_for(1) == [Posted(reply_to="r", status=202)]
