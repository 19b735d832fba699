"""errors: the wire's error codes and the exception types the transport raises."""

from __future__ import annotations

import anyio
import pytest

from mcp_sse_transport import errors
from mcp_sse_transport.errors import (
    ConnectionLostError,
    ErrorCode,
    EventTooLargeError,
    FencedError,
    GrantError,
    SessionClosedError,
    SessionExpiredError,
    SlowConsumerError,
    StoreError,
    StoreUnavailableError,
)

from ._sdk_compat import jsonrpc

SDK_CODES = {-32000, -32001, -32002, -32042} | {
    value for name, value in vars(jsonrpc).items() if name.isupper() and isinstance(value, int)
}
"""Codes the MCP SDKs use or retired (connection closed, request timeout, resource not found,
URL elicitation), and every code the installed SDK defines: the transport's own stay clear."""


def test_exports() -> None:
    assert set(errors.__all__) == {
        "ConnectionLostError",
        "ErrorCode",
        "EventTooLargeError",
        "FencedError",
        "GrantError",
        "SessionClosedError",
        "SessionExpiredError",
        "SlowConsumerError",
        "StoreError",
        "StoreUnavailableError",
    }
    assert all(hasattr(errors, name) for name in errors.__all__)


def test_documented_code_values() -> None:
    assert {code.name: int(code) for code in ErrorCode} == {
        "PARSE_ERROR": -32700,
        "INVALID_REQUEST": -32600,
        "INTERNAL_ERROR": -32603,
        "SLOW_CONSUMER": -32050,
        "SERVER_SHUTDOWN": -32051,
        "RESUME_UNKNOWN": -32052,
        "RESUME_GAP": -32053,
        "SUPERSEDED": -32054,
        "REQUEST_INTERRUPTED": -32055,
        "STORE_UNAVAILABLE": -32056,
        "MESSAGE_TOO_LARGE": -32057,
    }


def test_codes_are_plain_ints_on_the_wire() -> None:
    code: int = ErrorCode.SLOW_CONSUMER
    assert code == -32050
    assert isinstance(code, int)
    assert ErrorCode(-32054) is ErrorCode.SUPERSEDED
    assert f"{int(ErrorCode.RESUME_GAP)}" == "-32053"


def test_codes_are_unique() -> None:
    values = [int(code) for code in ErrorCode]
    assert len(values) == len(set(values))


def test_the_transports_own_codes_are_in_the_server_range_clear_of_the_sdks() -> None:
    standard = {ErrorCode.PARSE_ERROR, ErrorCode.INVALID_REQUEST, ErrorCode.INTERNAL_ERROR}
    own = [code for code in ErrorCode if code not in standard]
    assert own
    for code in own:
        assert -32099 <= code <= -32000, code
        assert int(code) not in SDK_CODES, code


def test_an_unknown_code_is_refused() -> None:
    with pytest.raises(ValueError, match="-1"):
        ErrorCode(-1)


# -- exception types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error_type", [SlowConsumerError, ConnectionLostError, SessionExpiredError, StoreUnavailableError]
)
def test_a_lost_peer_is_a_broken_resource_as_the_sdk_expects(error_type: type[Exception]) -> None:
    assert issubclass(error_type, anyio.BrokenResourceError)
    with pytest.raises(anyio.BrokenResourceError, match="gone"):
        raise error_type("gone")


def test_a_session_closed_here_is_a_closed_resource() -> None:
    assert issubclass(SessionClosedError, anyio.ClosedResourceError)
    assert not issubclass(SessionClosedError, anyio.BrokenResourceError)


def test_the_broken_kinds_are_distinct() -> None:
    kinds = [SlowConsumerError, ConnectionLostError, SessionExpiredError, StoreUnavailableError, SessionClosedError]
    for kind in kinds:
        assert [other for other in kinds if issubclass(kind, other)] == [kind]


def test_event_too_large_says_its_size_and_the_limit() -> None:
    error = EventTooLargeError(5000, 4096)
    assert isinstance(error, ValueError)
    assert (error.size, error.limit) == (5000, 4096)
    assert str(error) == "an event of 5000 bytes is over the limit of 4096 bytes"


def test_grant_error_is_a_runtime_error() -> None:
    assert issubclass(GrantError, RuntimeError)


def test_store_errors_are_transient_by_default() -> None:
    assert StoreError.transient is True
    assert StoreError("timed out").transient is True
    assert not issubclass(StoreError, anyio.BrokenResourceError)


def test_marking_one_store_error_permanent_leaves_the_others_transient() -> None:
    permanent = StoreError("gone")
    permanent.transient = False
    assert not permanent.transient
    assert StoreError("another").transient
    assert StoreError.transient is True


def test_fenced_is_a_permanent_store_error() -> None:
    assert issubclass(FencedError, StoreError)
    assert FencedError.transient is False
    assert FencedError("moved").transient is False
    with pytest.raises(StoreError):
        raise FencedError("moved")


def test_store_error_keeps_the_stores_exception_as_its_cause() -> None:
    cause = ConnectionRefusedError("refused")
    with pytest.raises(StoreError) as caught:
        raise StoreError("append failed") from cause
    assert caught.value.__cause__ is cause
