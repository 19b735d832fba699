"""Shared fixtures: anyio's own pytest plugin runs the async tests, on asyncio (uvicorn's loop).

Redis: ``redis_url`` is the server of the whole run, CI's (``MCP_SSE_TEST_REDIS_URL``) or one
started here; ``redis_prefix`` scopes a test's keys; ``redis_client`` is a client of it for one
test, which deletes the test's keys afterwards; ``redis_process`` is a server of a test's own,
to kill, pause or restart.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import pytest
from hypothesis import settings
from redis.asyncio import Redis

from ._redis import RedisProcess, RedisServerMissingError, redis_server_binary

REDIS_URL_ENV = "MCP_SSE_TEST_REDIS_URL"

# No per-example deadline: how long an example takes is the machine's load, not the code's
# correctness (no timing thresholds in tests); every test is bounded by its own fail_after.
settings.register_profile("mcp-sse-transport", deadline=None)
settings.load_profile("mcp-sse-transport")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _start_redis() -> RedisProcess:
    """A started ``redis-server``; a missing one fails the test with what to install."""
    try:
        redis_server_binary()
    except RedisServerMissingError as exc:
        message = str(exc)
    else:
        server = RedisProcess()
        try:
            return server.start()
        except BaseException:
            server.close()  # its directory
            raise
    pytest.fail(message, pytrace=False)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis for the whole run: ``$MCP_SSE_TEST_REDIS_URL`` if set, else a ``redis-server``
    started for the session (missing ``redis-server`` fails the tests: they are never skipped)."""
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        yield url
        return
    server = _start_redis()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of this test's own, so tests sharing a server never see each other's keys."""
    return f"test-{uuid4().hex[:12]}:"


@pytest.fixture
async def redis_client(redis_url: str, redis_prefix: str) -> AsyncIterator[Redis]:
    """A client of ``redis_url`` (bytes responses, as the stores need), closed after the test,
    which also deletes the keys under ``redis_prefix``."""
    client = Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        yield client
        keys = [key async for key in client.scan_iter(match=f"{redis_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    """A ``redis-server`` of this test's own, to kill, pause or restart (closed afterwards)."""
    server = _start_redis()
    try:
        yield server
    finally:
        server.close()
