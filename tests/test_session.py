"""A session as the host holds it: its routing, the request ids it has seen, a restore, and the
outcomes of a POST."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest

from mcp_sse_transport import _sdk
from mcp_sse_transport._sdk import Inbound, session_message, types
from mcp_sse_transport.handler import SessionHandler
from mcp_sse_transport.ids import SEEN_REQUEST_IDS
from mcp_sse_transport.session import (
    ACCEPTED,
    NOT_FOUND,
    NOT_HERE,
    REPEATED,
    STORE_UNAVAILABLE,
    Attempts,
    Delivery,
    OneStream,
    Outcome,
    Restore,
    SeenIds,
    Session,
    SessionsFull,
)

from ._handlers import quiet_config

SESSION = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def inbound() -> Iterator[Inbound]:
    sender, receiver = _sdk.server_streams()
    yield sender
    sender.close()
    receiver.close()


def test_session_defaults(inbound: Inbound) -> None:
    handler = SessionHandler(SESSION, quiet_config())
    session = Session(handler, inbound, "owner-fingerprint")
    assert session.handler is handler
    assert session.inbound is inbound
    assert session.owner == "owner-fingerprint"
    assert session.swallow is None
    assert not session.handed_off
    assert session.seen is None
    assert not session.exchanged
    assert session.restore is None
    assert session.lease is None
    assert isinstance(session.attempts, Attempts)
    assert (session.attempts.in_flight, session.attempts.undelivered) == ({}, {})


def test_sessions_do_not_share_attempts(inbound: Inbound) -> None:
    one = Session(SessionHandler(SESSION, quiet_config()), inbound, "")
    other = Session(SessionHandler("f" * 32, quiet_config()), inbound, "")
    assert one.attempts is not other.attempts


def test_session_routes_everything_to_its_handler_by_default(inbound: Inbound) -> None:
    handler = SessionHandler(SESSION, quiet_config())
    session = Session(handler, inbound, "")
    assert isinstance(session.routing, OneStream)
    assert session.routing.stream is handler


def test_session_id_is_its_handlers(inbound: Inbound) -> None:
    session = Session(SessionHandler(SESSION, quiet_config()), inbound, "")
    assert session.session_id == SESSION


@pytest.mark.parametrize(
    "message",
    [
        types.JSONRPCRequest(jsonrpc="2.0", id=1, method="sampling/createMessage"),
        types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress"),
        types.JSONRPCResponse(jsonrpc="2.0", id=1, result={}),
        types.JSONRPCError(jsonrpc="2.0", id=1, error=types.ErrorData(code=-1, message="m")),
    ],
)
def test_one_stream_is_for_every_message_kind(message: types.JSONRPCMessage) -> None:
    handler = SessionHandler(SESSION, quiet_config())
    assert OneStream(handler).stream_for(session_message(message)) is handler


# -- SeenIds -------------------------------------------------------------------------------------


def test_seen_ids_accept_a_new_id_and_refuse_a_repeat() -> None:
    seen = SeenIds()
    assert seen.add(1)
    assert seen.add("a")
    assert not seen.add(1)
    assert not seen.add("a")
    assert seen.add(2)


def test_seen_ids_tell_a_str_id_from_an_int_id_with_the_same_text() -> None:
    seen = SeenIds()
    assert seen.add(7)
    assert seen.add("7"), 'JSON-RPC ids 7 and "7" are different ids'
    assert not seen.add(7)
    assert not seen.add("7")


def test_seen_ids_forget_the_oldest_past_their_limit() -> None:
    assert SEEN_REQUEST_IDS == 10_000
    seen = SeenIds()
    for request_id in range(SEEN_REQUEST_IDS):
        assert seen.add(request_id)
    assert not seen.add(0), "at the limit, the oldest is still remembered"
    assert seen.add(SEEN_REQUEST_IDS), "one past the limit: the oldest (0) is forgotten"
    assert seen.add(0), "the evicted id is accepted again"
    # Accepting 0 again evicted 1, the next oldest; every newer id is still remembered.
    for request_id in (2, SEEN_REQUEST_IDS // 2, SEEN_REQUEST_IDS - 1, SEEN_REQUEST_IDS, 0):
        assert not seen.add(request_id)
    assert seen.add(1)


def test_seen_ids_a_refused_repeat_does_not_refresh_or_evict() -> None:
    seen = SeenIds()
    for request_id in range(SEEN_REQUEST_IDS):
        seen.add(request_id)
    for _ in range(3):
        assert not seen.add(SEEN_REQUEST_IDS - 1)
    assert not seen.add(0), "refused repeats take no room"


# -- Restore -------------------------------------------------------------------------------------


def test_restore_keeps_the_version() -> None:
    assert Restore("2025-06-18").version == "2025-06-18"


@pytest.mark.anyio
async def test_restore_lock_queues_concurrent_first_posts() -> None:
    restore = Restore("2025-06-18")
    assert isinstance(restore.lock, anyio.Lock)
    entered: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await restore.lock.acquire()

            async def first_post(name: str) -> None:
                async with restore.lock:
                    entered.append(name)

            tg.start_soon(first_post, "a")
            tg.start_soon(first_post, "b")
            await anyio.wait_all_tasks_blocked()
            assert entered == [], "both wait while the handshake is replayed"
            restore.lock.release()
    assert sorted(entered) == ["a", "b"]


def test_restores_do_not_share_a_lock() -> None:
    assert Restore("2025-06-18").lock is not Restore("2025-06-18").lock


# -- Outcome, SessionsFull -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "status", "retry"),
    [(ACCEPTED, 202, False), (NOT_FOUND, 404, False), (NOT_HERE, 421, False), (STORE_UNAVAILABLE, 503, True)],
)
def test_outcome_constants(outcome: Outcome, status: int, retry: bool) -> None:
    assert outcome.status == status
    assert outcome.retry is retry
    assert outcome.text
    assert not outcome.json
    assert outcome.report is None


def test_outcome_texts() -> None:
    assert ACCEPTED.text == "Accepted"
    assert NOT_FOUND.text == NOT_HERE.text == "Could not find session"
    assert STORE_UNAVAILABLE.text == "Session store unavailable"


def test_outcome_is_frozen() -> None:
    with pytest.raises(AttributeError):
        ACCEPTED.status = 200  # type: ignore[misc]


def test_sessions_full_is_a_plain_exception() -> None:
    """Not a closed or broken stream: the host's callers tell it from a session that ended."""
    assert issubclass(SessionsFull, Exception)
    assert not issubclass(SessionsFull, anyio.ClosedResourceError | anyio.BrokenResourceError)
    assert str(SessionsFull("max_sessions reached")) == "max_sessions reached"


# -- Delivery, REPEATED ----------------------------------------------------------------------------


def test_delivery_defaults_add_nothing_and_allow_server_requests() -> None:
    delivery = Delivery()
    assert delivery.on_unanswered is None
    assert delivery.close_stream is None
    assert delivery.close_standalone is None
    assert delivery.can_send_request is True
    assert delivery.once is True, "a request id is delivered once unless the front end says otherwise"


def test_delivery_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Delivery().can_send_request = False  # type: ignore[misc]


def test_repeated_answers_as_accepted_but_is_its_own_outcome() -> None:
    """The legacy front end answers a repeated POST as it answers the first; Streamable HTTP
    tells the two apart, by identity."""
    assert (REPEATED.status, REPEATED.text) == (ACCEPTED.status, ACCEPTED.text) == (202, "Accepted")
    assert REPEATED is not ACCEPTED
    assert not REPEATED.retry and REPEATED.report is None
