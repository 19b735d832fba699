"""Redis's failures as StoreError: the message, the session id scrubbed from it, the cause kept;
and a real failure, a Redis that cannot be reached."""

from __future__ import annotations

import anyio
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mcp_sse_transport.errors import StoreError
from mcp_sse_transport.redis_errors import REDIS_FAILURES, redis_errors, store_error

from ._support import free_socket

SESSION = "0123456789abcdef0123456789abcdef"
TAG = "01234567"


def test_redis_failures_are_redis_errors_and_os_errors() -> None:
    assert (RedisError, OSError) == REDIS_FAILURES


def test_store_error_names_the_operation_the_session_tag_and_the_detail() -> None:
    error = store_error("append", SESSION, ResponseError("OOM command not allowed"))
    assert isinstance(error, StoreError)
    assert str(error) == f"append for session {TAG} failed: OOM command not allowed"


def test_store_error_scrubs_the_whole_session_id_from_the_detail() -> None:
    detail = f"WRONGTYPE on key prefix:{{{SESSION}}}:events and {SESSION}"
    error = store_error("read", SESSION, ResponseError(detail))
    assert SESSION not in str(error)
    assert str(error) == f"read for session {TAG} failed: WRONGTYPE on key prefix:{{{TAG}…}}:events and {TAG}…"


def test_store_error_names_the_type_when_the_error_has_no_text() -> None:
    assert str(store_error("renew", SESSION, RedisTimeoutError())) == f"renew for session {TAG} failed: TimeoutError"
    assert str(store_error("renew", SESSION, OSError())) == f"renew for session {TAG} failed: OSError"


def test_store_error_is_transient() -> None:
    assert store_error("append", SESSION, RedisConnectionError("refused")).transient


@pytest.mark.parametrize(
    "exc",
    [
        RedisConnectionError("Connection refused"),
        ResponseError("NOSCRIPT"),
        ConnectionResetError(104, "reset"),
        OSError(),
    ],
)
def test_redis_errors_raise_a_store_error_chained_from_the_failure(exc: Exception) -> None:
    with pytest.raises(StoreError) as raised, redis_errors("append", SESSION):
        raise exc
    assert raised.value.__cause__ is exc
    assert str(raised.value).startswith(f"append for session {TAG} failed: ")
    assert str(raised.value) == str(store_error("append", SESSION, exc))


def test_redis_errors_scrub_the_session_id() -> None:
    with pytest.raises(StoreError) as raised, redis_errors("claim", SESSION):
        raise ResponseError(f"bad key {SESSION}")
    assert SESSION not in str(raised.value)


@pytest.mark.parametrize("exc", [ValueError("not redis"), KeyError("k"), StoreError("already one"), RuntimeError()])
def test_redis_errors_let_other_exceptions_through_untouched(exc: Exception) -> None:
    with pytest.raises(type(exc)) as raised, redis_errors("append", SESSION):
        raise exc
    assert raised.value is exc
    assert raised.value.__cause__ is None


def test_redis_errors_take_a_builtin_timeout_for_a_failure() -> None:
    """TimeoutError is an OSError: a command that timed out inside is a store failure."""
    timeout = TimeoutError()
    with pytest.raises(StoreError, match=r"failed: TimeoutError$") as raised, redis_errors("append", SESSION):
        raise timeout
    assert raised.value.__cause__ is timeout


def test_redis_errors_let_a_base_exception_through() -> None:
    with pytest.raises(KeyboardInterrupt), redis_errors("append", SESSION):
        raise KeyboardInterrupt


def test_redis_errors_do_nothing_without_a_failure() -> None:
    with redis_errors("append", SESSION):
        result = 1 + 1
    assert result == 2


@pytest.mark.anyio
async def test_a_redis_that_cannot_be_reached_raises_a_store_error() -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    # One try: redis-py would otherwise retry the refused connection, backing off.
    client = Redis(host="127.0.0.1", port=port, socket_connect_timeout=5, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        with anyio.fail_after(20):
            with pytest.raises(StoreError) as raised, redis_errors("append", SESSION):
                await client.get(f"prefix:{{{SESSION}}}:events")
    finally:
        await client.aclose()
    assert isinstance(raised.value.__cause__, RedisConnectionError)
    assert str(raised.value).startswith(f"append for session {TAG} failed: ")
    assert SESSION not in str(raised.value)
