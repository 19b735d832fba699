"""The worker's channel: one Redis pub/sub channel per worker, typed messages on it.

Each worker subscribes to a channel of its own (``{prefix}worker:<id>``) before it takes any
lease, and gets there what other workers send it; a worker knows another is gone when nobody
is subscribed to its channel. Messages arrive decoded (:mod:`.messages`) and go to the handler
registered for their type; work that outlives a message runs in the bus's task group.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import suppress
from types import TracebackType
from typing import Any, TypeVar
from uuid import uuid4

import anyio
import anyio.abc
from redis.asyncio import Redis

from ..config import SseConfig
from ..errors import StoreError
from ..redis_errors import REDIS_FAILURES
from .messages import Message, MessageError, decode, encode

__all__ = ["RESUBSCRIBE_WINDOW", "Bus", "OwnerUnreachable"]

logger = logging.getLogger("mcp_sse_transport")

RESUBSCRIBE_WINDOW = 1.0
"""Seconds a message nobody received is sent again for: a worker subscribing again after a fault
of its channel's connection is back well within it (one round trip, or redis-py's reconnect)."""

M = TypeVar("M", bound=Message)


class OwnerUnreachable(Exception):
    """No worker listens on the session owner's channel: it died, or lost Redis."""


class Bus:
    """This worker's channel: what it receives, dispatched by type, and what it sends.

    ``redis`` retries idempotent commands; ``once`` never sends a command twice, and carries
    every ``PUBLISH`` (a chunk or a POST relayed twice would run twice).
    """

    def __init__(self, redis: Redis, once: Redis, config: SseConfig) -> None:
        self.redis = redis
        self.config = config
        self.worker_id = uuid4().hex[:16]
        self._once = once
        self._channel = self.channel(self.worker_id)
        self._handlers: dict[type[Any], Callable[[Any], None]] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._stopping: anyio.abc.TaskGroup | None = None
        """The task group once :meth:`stop` cancelled it, until :meth:`__aexit__` awaits it."""
        self._redis_run_id: str | None = None
        """The ``run_id`` of the Redis this worker last saw, to tell when it restarted."""

    def channel(self, worker_id: str) -> bytes:
        """The channel ``worker_id`` listens on."""
        return f"{self.config.redis_prefix}worker:{worker_id}".encode()

    def on(self, kind: type[M], handler: Callable[[M], None]) -> None:
        """Call ``handler`` with each message of type ``kind`` received (one handler per type,
        called in the listening task: one that awaits must :meth:`spawn`)."""
        self._handlers[kind] = handler

    # -- lifecycle -----------------------------------------------------------------------------

    def check_running(self) -> None:
        """Raise RuntimeError unless the bus was entered (``async with``): a worker that is not
        subscribed to its channel would never get what other workers send it."""
        if self._task_group is None:
            raise RuntimeError("the cluster is not running: enter the transport with `async with` first")

    @property
    def task_group(self) -> anyio.abc.TaskGroup:
        """Where work that outlives a message or a request runs (sessions taken over, relays)."""
        self.check_running()
        assert self._task_group is not None
        return self._task_group

    def spawn(self, what: str, function: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run ``function(*args)`` in the task group; a failure is logged, never allowed to end
        the worker (it would take every other session with it). RuntimeError if not running."""

        async def guarded() -> None:
            try:
                await function(*args)
            except Exception:
                logger.exception("cluster: %s failed", what)

        self.task_group.start_soon(guarded)

    async def __aenter__(self) -> Bus:
        pubsub: Any = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)  # before any lease is taken: nothing sent to us is lost
        except REDIS_FAILURES as exc:
            await pubsub.aclose()
            raise StoreError(f"could not subscribe to this worker's channel: {exc}") from exc
        self._task_group = await anyio.create_task_group().__aenter__()
        self._task_group.start_soon(self._listen, pubsub)
        logger.info("cluster worker %s joined", self.worker_id)
        return self

    def stop(self) -> None:
        """Stop listening and cancel the spawned work; :meth:`spawn` refuses from now on."""
        if self._task_group is not None:
            self._stopping, self._task_group = self._task_group, None
            self._stopping.cancel_scope.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> bool | None:
        self.stop()
        task_group, self._stopping = self._stopping, None
        assert task_group is not None, "not entered"
        return await task_group.__aexit__(exc_type, exc_val, exc_tb)

    # -- receiving -----------------------------------------------------------------------------

    async def _listen(self, pubsub: Any) -> None:
        """Dispatch this worker's messages; subscribe again whenever Redis drops us (a redis-py
        PubSub does not recover from a server restart: a new one is made). The first time at
        once, on a connection of its own: a fault of the subscription's connection alone (killed,
        reset) stays its own, and the other connections' commands in flight go on. Only if
        Redis itself could not be reached, with backoff, and once it is back, if it restarted
        (its ``run_id`` changed), the idle pooled connections are dropped (each would fail one
        command); connections in use are never dropped here.
        What other workers send meanwhile is not lost: nobody receives it, so they send again
        (:meth:`publish`)."""
        failures = 0
        await self._restarted()  # which Redis this is, to tell a restart from a fault of ours
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                        await pubsub.subscribe(self._channel)
                        if failures > 1 and await self._restarted():
                            await self.redis.connection_pool.disconnect(inuse_connections=False)
                            if self._once is not self.redis:  # never retried: its stale connections would fail
                                await self._once.connection_pool.disconnect(inuse_connections=False)
                        failures = 0
                        logger.info("cluster: this worker's channel is back")
                    message = await pubsub.get_message(timeout=1.0)
                except REDIS_FAILURES as exc:
                    failures += 1
                    (logger.warning if failures == 1 else logger.debug)(
                        "cluster: lost this worker's channel (%s); subscribing again", exc
                    )
                    if pubsub is not None:
                        with anyio.CancelScope(shield=True), suppress(*REDIS_FAILURES):
                            await pubsub.aclose()
                        pubsub = None
                    if failures > 1:  # Redis itself is unreachable: back off
                        await anyio.sleep(min(0.1 * 2 ** min(failures - 2, 8), self.config.owner_lease / 3))
                    continue
                if message is not None and message.get("type") == "message":
                    self._receive(message["data"])
        finally:
            if pubsub is not None:
                with anyio.CancelScope(shield=True), suppress(*REDIS_FAILURES):
                    await pubsub.aclose()

    async def _restarted(self) -> bool:
        """Whether Redis restarted since this worker last asked (its ``run_id`` changed), or
        cannot say: then the pooled connections from before it are dead."""
        try:
            info = await self.redis.info("server")
        except REDIS_FAILURES:
            return True
        previous, self._redis_run_id = self._redis_run_id, str(info.get("run_id"))
        return previous != self._redis_run_id

    def _receive(self, data: bytes) -> None:
        """Decode and dispatch what arrived; what is not a message of this protocol is dropped."""
        try:
            message = decode(data)
        except MessageError as exc:
            logger.warning("cluster: dropped a message this worker cannot read: %s", exc)
            return
        self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(message)

    # -- sending -------------------------------------------------------------------------------

    async def publish(self, worker_id: str, message: Message) -> int:
        """Send to a worker; returns how many received it (0: nobody listens there).

        Nobody receiving it may mean the worker is subscribing again after a fault of its
        channel's connection: it is sent again, with backoff, for up to
        :data:`RESUBSCRIBE_WINDOW` (or a third of ``owner_lease``), before 0 is returned. A
        message nobody received is never lost silently: the sender learns of it (and one
        received is never sent again). Raises RedisError, OSError."""
        data = encode(message)
        channel = self.channel(worker_id)
        window = min(RESUBSCRIBE_WINDOW, self.config.owner_lease / 3)
        delay, waited = 0.005, 0.0
        while not (received := int(await self._once.publish(channel, data))) and waited < window:
            await anyio.sleep(delay)  # nothing to wait on: the receiver's subscription is in Redis
            waited += delay
            delay = min(delay * 2, max(window - waited, 0.005))
        return received

    async def listening(self, worker_id: str) -> bool:
        """Whether anyone is subscribed to ``worker_id``'s channel. Raises RedisError, OSError."""
        counts = await self.redis.pubsub_numsub(self.channel(worker_id))
        return bool(counts) and int(counts[0][1]) > 0
