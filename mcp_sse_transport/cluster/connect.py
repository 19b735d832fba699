"""Connecting to Redis: a worker's two clients, and its event store."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from ..config import SseConfig
from ..redis_store import RedisEventStore
from ..store import EventStore

__all__ = ["connect"]


def connect(config: SseConfig, event_store: EventStore | None) -> tuple[Redis, RedisEventStore]:
    """The Redis side of a worker with ``redis_url``: a client that retries what may run twice,
    and the event store (``event_store``, or one on a client that never sends a command twice,
    which also carries every ``PUBLISH``)."""
    url = config.redis_url
    assert url is not None

    def client(retry: Retry) -> Redis:
        return Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=config.forward_timeout,
            retry=retry,
            health_check_interval=30,
        )

    # Tried once more after a dropped connection (a lost reply, say): only what may run twice
    # goes through it (reads, SET, SREM, PEXPIRE, scripts made idempotent). A timeout is not
    # tried again: every command keeps its deadline.
    redis = client(Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, supported_errors=(RedisConnectionError,)))
    if event_store is None:
        # Never tried again by the client: an append (XADD) or a PUBLISH sent twice would run twice.
        event_store = RedisEventStore(
            client(Retry(NoBackoff(), 0)),
            prefix=config.redis_prefix,
            max_events=config.replay_max_events,
            max_age=config.replay_max_age,
        )
    elif not isinstance(event_store, RedisEventStore):
        raise ValueError("with redis_url, event_store must be a RedisEventStore (or None)")
    return redis, event_store
