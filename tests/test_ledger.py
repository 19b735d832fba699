"""The in-memory request ledger: a request id is admitted once per session; notifications and
responses always; the takeover hooks do nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from mcp_sse_transport import _sdk
from mcp_sse_transport._sdk import types
from mcp_sse_transport.handler import SessionHandler
from mcp_sse_transport.ledger import MemoryRequestLedger, RequestLedger
from mcp_sse_transport.session import SeenIds, Session

from ._handlers import quiet_config

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def session() -> AsyncIterator[Session]:
    inbound, read_stream = _sdk.server_streams()
    handler = SessionHandler(SESSION, quiet_config())
    yield Session(handler, inbound, "")
    await handler.close()
    inbound.close()
    read_stream.close()


def _request(request_id: types.RequestId) -> types.JSONRPCRequest:
    return types.JSONRPCRequest(jsonrpc="2.0", id=request_id, method="tools/list")


async def _record(ledger: RequestLedger, session: Session, message: types.JSONRPCMessage) -> bool | None:
    async with ledger.admit(session, message, _sdk.serialize(message)) as admission:
        recorded = await admission.record()
        admission.delivered()
    return recorded


async def test_a_request_is_admitted_once(session: Session) -> None:
    ledger = MemoryRequestLedger()
    with anyio.fail_after(5):
        assert await _record(ledger, session, _request(1)) is True
        assert await _record(ledger, session, _request(1)) is False, "a POST sent again"
        assert await _record(ledger, session, _request(2)) is True
        assert await _record(ledger, session, _request("1")) is True, "a str id is another id"


async def test_request_ids_are_kept_with_the_session(session: Session) -> None:
    assert session.seen is None
    with anyio.fail_after(5):
        await _record(MemoryRequestLedger(), session, _request("a"))
        assert isinstance(session.seen, SeenIds)
        assert not session.seen.add("a")
        assert await _record(MemoryRequestLedger(), session, _request("b")) is True
        assert await _record(MemoryRequestLedger(), session, _request("a")) is False, "another ledger, same session"


async def test_sessions_have_ids_of_their_own(session: Session) -> None:
    inbound, read_stream = _sdk.server_streams()
    other_handler = SessionHandler("f" * 32, quiet_config())
    other = Session(other_handler, inbound, "")
    ledger = MemoryRequestLedger()
    with anyio.fail_after(5):
        assert await _record(ledger, session, _request(1)) is True
        assert await _record(ledger, other, _request(1)) is True
        await other_handler.close()
    inbound.close()
    read_stream.close()


@pytest.mark.parametrize(
    "message",
    [
        types.JSONRPCNotification(jsonrpc="2.0", method="notifications/cancelled", params={"requestId": 1}),
        types.JSONRPCResponse(jsonrpc="2.0", id=1, result={}),
        types.JSONRPCError(jsonrpc="2.0", id=1, error=types.ErrorData(code=-1, message="m")),
    ],
)
async def test_notifications_and_responses_are_always_admitted_and_never_remembered(
    session: Session, message: types.JSONRPCMessage
) -> None:
    ledger = MemoryRequestLedger()
    with anyio.fail_after(5):
        assert await _record(ledger, session, message) is True
        assert await _record(ledger, session, message) is True
        assert session.seen is None, "nothing remembered"
        assert await _record(ledger, session, _request(1)) is True, "a response's id is not a request's"


async def test_an_admission_not_recorded_remembers_nothing(session: Session) -> None:
    ledger = MemoryRequestLedger()
    with anyio.fail_after(5):
        async with ledger.admit(session, _request(1), b"{}"):
            pass
        assert session.seen is None
        assert await _record(ledger, session, _request(1)) is True


async def test_the_takeover_hooks_do_nothing(session: Session) -> None:
    ledger = MemoryRequestLedger()
    initialize, initialized = _sdk.restored_handshake("2025-06-18")
    with anyio.fail_after(5):
        await ledger.record_restored(session, initialize, initialized)
        await ledger.answered(session, session.handler, 1)
        await ledger.after_delivery(session, types.JSONRPCNotification(jsonrpc="2.0", method="notifications/cancelled"))
    assert session.seen is None
    assert session.handler.statistics().buffered_events == 0, "nothing sent to the client"
    with anyio.fail_after(5):
        assert await _record(ledger, session, initialize) is True, "the restored initialize was not recorded"


def test_on_unanswered_is_none() -> None:
    handler = SessionHandler(SESSION, quiet_config())
    inbound, read_stream = _sdk.server_streams()
    session = Session(handler, inbound, "")
    assert MemoryRequestLedger().on_unanswered(session, _request(1)) is None
    inbound.close()
    read_stream.close()
