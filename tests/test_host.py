"""host: ``SessionHost`` with a ``LocalBackplane``, without sockets.

The SDK server's side is played by reading the session's read stream here (``ServerSide``), or
by a real lowlevel ``Server``; what the handler writes goes to a recording sink. Over HTTP the
same paths are in test_transport.py, test_integration.py, test_restored_sessions.py and
test_probe_sessions.py; takeovers (``SessionHost.run``) are in test_cluster*.py.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest
from starlette.requests import Request

from mcp_sse_transport import ErrorCode, InMemoryEventStore, SseConfig, _sdk
from mcp_sse_transport._sdk import (
    RESTORED_REQUEST_ID,
    ContextReceiveStream,
    ServerMessageMetadata,
    SessionMessage,
    session_message,
)
from mcp_sse_transport.backplane import LocalBackplane
from mcp_sse_transport.errors import StoreError
from mcp_sse_transport.host import SessionHost
from mcp_sse_transport.ledger import MemoryRequestLedger
from mcp_sse_transport.session import ACCEPTED, NOT_HERE, REPEATED, Delivery, Restore, Session, SessionsFull

from ._handlers import parse, quiet_config
from ._sdk_compat import needs_mcp2, types
from .test_handler import RecordingSink, Runner, start
from .test_integration import lowlevel_server

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"
THIRD = "00112233445566778899aabbccddeeff"


def new_host(**overrides: object) -> tuple[SessionHost, InMemoryEventStore]:
    store = InMemoryEventStore()
    return SessionHost(quiet_config(**overrides), LocalBackplane(store)), store


def post_request() -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/messages/",
        "query_string": f"session_id={SESSION}".encode(),
        "headers": [(b"content-type", b"application/json")],
    }
    return Request(scope)


def request_body(request_id: types.RequestId, method: str = "ping") -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method}).encode()


INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
    }
).encode()


class ServerSide:
    """Reads a session's read stream as the SDK server would, recording what arrives."""

    def __init__(self, read_stream: ContextReceiveStream[SessionMessage | Exception]) -> None:
        self.read_stream = read_stream
        self.items: list[SessionMessage | Exception] = []
        self.ended = False
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def __call__(self) -> None:
        async for item in self.read_stream:
            self.items.append(item)
            self._notify()
        self.ended = True
        self._notify()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    @property
    def messages(self) -> list[types.JSONRPCMessage]:
        return [_sdk.message_of(item) for item in self.items if isinstance(item, SessionMessage)]


def events_of(sink: RecordingSink) -> list[tuple[str, Any]]:
    return [(event.event, json.loads(event.data)) for event in parse(sink.data)]


# -- opening and ending sessions -------------------------------------------------------------------


async def test_open_registers_the_session_and_the_statistics_count_it() -> None:
    host, _ = new_host()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "owner-fingerprint", None)
    assert host.sessions.get(SESSION) is session
    assert (session.session_id, session.owner, session.restore) == (SESSION, "owner-fingerprint", None)
    stats = host.statistics()
    assert stats.open_sessions == 1 and [s.session for s in stats.sessions] == [SESSION[:8]]
    await host.open(OTHER, "", None)
    assert host.statistics().open_sessions == 2
    with pytest.raises(KeyError):
        await host.open(SESSION, "", None)  # an id is registered once
    assert host.statistics().open_sessions == 2
    read_stream.close()


async def test_open_refuses_past_max_sessions() -> None:
    host, _ = new_host(max_sessions=2)
    with anyio.fail_after(5):
        await host.open(SESSION, "", None)
        await host.open(OTHER, "", None)
        with pytest.raises(SessionsFull):
            await host.open(THIRD, "", None)
    assert THIRD not in host.sessions and len(host.sessions) == 2


async def test_reserved_slots_count_against_max_sessions() -> None:
    host, _ = new_host(max_sessions=2)
    with anyio.fail_after(5):
        await host.open(SESSION, "", None)
        assert host.reserve_slot() is True  # a session being taken over, not yet registered
        assert host.reserve_slot() is False, "full: one open, one reserved"
        with pytest.raises(SessionsFull):
            await host.open(OTHER, "", None)
        host.release_slot()
        await host.open(OTHER, "", None)
    assert len(host.sessions) == 2
    assert host.reserve_slot() is False


async def test_concurrent_opens_never_overshoot_the_cap() -> None:
    host, _ = new_host(max_sessions=3)
    opened: list[str] = []
    refused: list[str] = []

    async def open_one(session_id: str) -> None:
        try:
            await host.open(session_id, "", None)
        except SessionsFull:
            refused.append(session_id)
        else:
            opened.append(session_id)

    ids = [f"{n:032x}" for n in range(8)]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for session_id in ids:
                tg.start_soon(open_one, session_id)
    assert len(opened) == 3 and len(refused) == 5
    assert sorted(host.sessions) == sorted(opened)
    assert host.reserve_slot() is False, "every slot was given back: none is leaked, none is extra"


class _UnsharedBackplane(LocalBackplane):
    """A backplane that cannot share new sessions (as Redis down would make it)."""

    async def register(self, session: Session) -> None:
        raise StoreError("the session could not be shared")


async def test_an_open_the_backplane_refuses_gives_its_slot_back() -> None:
    host = SessionHost(quiet_config(max_sessions=1), _UnsharedBackplane(InMemoryEventStore()))
    with anyio.fail_after(5):
        for _ in range(3):  # a leaked slot would turn the second attempt into SessionsFull
            with pytest.raises(StoreError):
                await host.open(SESSION, "", None)
    assert len(host.sessions) == 0
    assert host.reserve_slot() is True


async def test_serving_is_the_registered_session_or_none() -> None:
    host, _ = new_host()
    session, _ = await host.open(SESSION, "", None)
    assert host.serving(SESSION) is session
    assert host.serving(OTHER) is None
    host.discard(session)
    assert host.serving(SESSION) is None


async def test_discard_leaves_the_registry_and_closes_the_servers_inbound_end() -> None:
    host, _ = new_host()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", None)
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            host.discard(session)
            await server.wait_for(lambda: server.ended)
        with pytest.raises(anyio.ClosedResourceError):
            await session.inbound.send(session_message(types.JSONRPCNotification(jsonrpc="2.0", method="x")))
    assert SESSION not in host.sessions and host.statistics().open_sessions == 0
    assert server.items == [], "the server saw its read stream end, nothing else"


async def test_discard_keeps_a_newer_session_registered_under_the_same_id() -> None:
    host, _ = new_host()
    old, _ = await host.open(SESSION, "", None)
    host.discard(old)
    new, _ = await host.open(SESSION, "", None)
    host.discard(old)  # the old session's late cleanup
    assert host.serving(SESSION) is new


# -- delivering POSTed messages --------------------------------------------------------------------


async def test_a_valid_request_is_accepted_and_reaches_the_server_with_its_request() -> None:
    host, _ = new_host()
    request = post_request()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", None)
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            outcome = await host.deliver(session, request_body(7), request)
            assert outcome == ACCEPTED and (outcome.status, outcome.text) == (202, "Accepted")
            await anyio.wait_all_tasks_blocked()
            assert len(server.items) == 1
            tg.cancel_scope.cancel()
    (item,) = server.items
    assert isinstance(item, SessionMessage)
    message = _sdk.message_of(item)
    assert isinstance(message, types.JSONRPCRequest)
    assert (message.id, message.method) == (7, "ping")
    assert item.metadata is not None
    assert getattr(item.metadata, "request_context", None) is request
    assert session.exchanged, "a POST reached it: no probe"


async def test_a_request_posted_again_is_accepted_but_delivered_once() -> None:
    host, _ = new_host()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", None)
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            assert await host.deliver(session, request_body("same"), post_request()) == ACCEPTED
            again = await host.deliver(session, request_body("same"), post_request())
            assert (again.status, again.text) == (202, "Accepted")
            await anyio.wait_all_tasks_blocked()
            assert [message.id for message in server.messages if isinstance(message, types.JSONRPCRequest)] == ["same"]
            # Another id, and notifications (no id), are delivered as ever.
            assert await host.deliver(session, request_body("other"), post_request()) == ACCEPTED
            notification = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
            assert await host.deliver(session, notification, post_request()) == ACCEPTED
            assert await host.deliver(session, notification, post_request()) == ACCEPTED
            await anyio.wait_all_tasks_blocked()
            assert len(server.items) == 4
            tg.cancel_scope.cancel()


async def test_unparsable_json_is_400_and_its_report_puts_parse_error_on_the_stream() -> None:
    host, _ = new_host()
    sink = RecordingSink()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", None)
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            await start(tg, session.handler, sink)
            outcome = await host.deliver(session, b"{not json", post_request())
            assert (outcome.status, outcome.text, outcome.json) == (400, "Could not parse message", False)
            assert server.items == [] and sink.chunks == [], "refused: nothing yet, until the report"
            assert outcome.report is not None
            await outcome.report()
            await sink.wait_chunks(1)
            await session.handler.close()
            tg.cancel_scope.cancel()
    assert len(server.items) == 1 and isinstance(server.items[0], Exception), "the server sees the error, as stock"
    assert events_of(sink) == [("error", {"code": ErrorCode.PARSE_ERROR, "message": "Could not parse message"})]


async def test_a_request_id_over_the_limit_is_400_with_a_null_id_and_never_delivered() -> None:
    host, _ = new_host(max_request_id_bytes=16)
    sink = RecordingSink()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", None)
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            await start(tg, session.handler, sink)
            outcome = await host.deliver(session, request_body("x" * 15), post_request())  # 17 bytes as JSON
            assert (outcome.status, outcome.json) == (400, True)
            assert json.loads(outcome.text) == {
                "jsonrpc": "2.0",
                "id": None,
                "error": {
                    "code": ErrorCode.INVALID_REQUEST,
                    "message": "Request id too long",
                    "data": {"max_request_id_bytes": 16},
                },
            }
            await anyio.wait_all_tasks_blocked()
            assert server.items == []
            assert session.seen is None, "the id is not remembered either"
            assert outcome.report is not None
            await outcome.report()
            await sink.wait_chunks(1)
            # At the limit exactly (16 bytes with its quotes), an id is accepted.
            assert await host.deliver(session, request_body("x" * 14), post_request()) == ACCEPTED
            await session.handler.close()
            tg.cancel_scope.cancel()
    assert [message.id for message in server.messages if isinstance(message, types.JSONRPCRequest)] == ["x" * 14]
    ((event, body),) = events_of(sink)
    assert event == "error" and body["code"] == ErrorCode.INVALID_REQUEST


async def test_a_message_for_a_session_that_ended_is_not_here() -> None:
    host, _ = new_host()
    with anyio.fail_after(5):
        discarded, _ = await host.open(SESSION, "", None)
        host.discard(discarded)  # its inbound end closed
        outcome = await host.deliver(discarded, request_body(1), post_request())
        assert outcome == NOT_HERE and (outcome.status, outcome.text) == (421, "Could not find session")
        server_gone, read_stream = await host.open(OTHER, "", None)
        read_stream.close()  # its server stopped reading
        assert await host.deliver(server_gone, request_body(1), post_request()) == NOT_HERE


# -- restored sessions -----------------------------------------------------------------------------


async def test_a_restored_sessions_first_message_follows_the_replayed_handshake() -> None:
    host, _ = new_host()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", Restore("2025-06-18"))
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            assert await host.deliver(session, request_body(1, "tools/list"), post_request()) == ACCEPTED
            assert await host.deliver(session, request_body(2, "tools/list"), post_request()) == ACCEPTED
            tg.cancel_scope.cancel()
    initialize, initialized, first, second = server.messages
    assert isinstance(initialize, types.JSONRPCRequest) and initialize.method == "initialize"
    assert initialize.id == RESTORED_REQUEST_ID
    assert initialize.params is not None and initialize.params["protocolVersion"] == "2025-06-18"
    assert isinstance(initialized, types.JSONRPCNotification) and initialized.method == "notifications/initialized"
    assert isinstance(first, types.JSONRPCRequest) and first.id == 1
    assert isinstance(second, types.JSONRPCRequest) and second.id == 2, "replayed once, not per message"
    assert session.restore is None and session.swallow == RESTORED_REQUEST_ID


async def test_a_restored_session_that_opens_with_initialize_replays_nothing() -> None:
    host, _ = new_host()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", Restore("2025-06-18"))
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            assert await host.deliver(session, INITIALIZE, post_request()) == ACCEPTED
            assert await host.deliver(session, request_body(1), post_request()) == ACCEPTED
            tg.cancel_scope.cancel()
    assert [(getattr(m, "id", None), getattr(m, "method", None)) for m in server.messages] == [
        (0, "initialize"),
        (1, "ping"),
    ]
    assert session.restore is None and session.swallow is None


async def test_the_replayed_initializes_response_is_swallowed_by_the_write_stream() -> None:
    host, _ = new_host()
    server = lowlevel_server()
    sink = RecordingSink()
    with anyio.fail_after(10):
        session, read_stream = await host.open(SESSION, "", Restore("2025-06-18"))
        async with anyio.create_task_group() as tg:
            await start(tg, session.handler, sink)
            write_stream = host.write_stream(session, tg)
            tg.start_soon(server.run, read_stream, write_stream, server.create_initialization_options())
            assert await host.deliver(session, request_body(1), post_request()) == ACCEPTED
            await sink.wait_chunks(1)
            await anyio.wait_all_tasks_blocked()  # the server wrote all it had to
            tg.cancel_scope.cancel()
    assert events_of(sink) == [("message", {"jsonrpc": "2.0", "id": 1, "result": {}})]
    assert session.swallow is None, "the write stream took the initialize's response, once"


# -- lingering, shutting down, forgetting ----------------------------------------------------------


async def test_linger_of_a_probe_ends_it_as_soon_as_its_connection_goes() -> None:
    host, _ = new_host()  # session_grace of a minute: a lingering session outlives this test
    sink = RecordingSink()
    with anyio.fail_after(5):
        session, _ = await host.open(SESSION, "", None)
        async with anyio.create_task_group() as tg:
            runner = await start(tg, session.handler, sink)
            session.handler.connection_lost()
            await runner.done.wait()
            assert not session.handler.ended, "detached, waiting for a resume"
            await host.linger(session)
    assert session.handler.ended and session.handler.failed


async def test_linger_of_a_session_that_got_a_message_waits_for_a_resume() -> None:
    host, _ = new_host()
    sink = RecordingSink()
    lingered = anyio.Event()

    async def linger() -> None:
        await host.linger(session)
        lingered.set()

    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", None)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ServerSide(read_stream))
            runner = await start(tg, session.handler, sink)
            assert await host.deliver(session, request_body(1), post_request()) == ACCEPTED
            session.handler.connection_lost()
            await runner.done.wait()
            tg.start_soon(linger)
            await anyio.wait_all_tasks_blocked()
            assert not lingered.is_set() and not session.handler.ended
            await session.handler.close()  # ended another way: linger returns
            await lingered.wait()
            tg.cancel_scope.cancel()


async def test_shutdown_drains_every_session_and_marks_it_handed_off() -> None:
    host, _ = new_host(retry_interval=1.5)
    sinks = {SESSION: RecordingSink(), OTHER: RecordingSink()}
    runners: dict[str, Runner] = {}
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            sessions = [(await host.open(session_id, "", None))[0] for session_id in sinks]
            for session in sessions:
                runners[session.session_id] = await start(tg, session.handler, sinks[session.session_id])
                await session.handler.send(f"before {session.session_id[:4]}")
            await host.shutdown()
            for runner in runners.values():
                await runner.done.wait()
    assert host.sessions.shutting_down and host.statistics().shutting_down
    for session in sessions:
        assert session.handed_off and session.handler.ended and not session.handler.failed
        assert runners[session.session_id].graceful is True
        events = parse(sinks[session.session_id].data)
        assert [(event.event, event.data) for event in events[:1]] == [("message", f"before {session.session_id[:4]}")]
        assert events[1].event == "error" and json.loads(events[1].data)["code"] == ErrorCode.SERVER_SHUTDOWN
        assert events[1].retry == 1500
        assert len(events) == 2


async def test_forget_drops_the_sessions_log_from_the_store() -> None:
    host, store = new_host()
    sink = RecordingSink()
    with anyio.fail_after(5):
        session, _ = await host.open(SESSION, "", None)
        other, _ = await host.open(OTHER, "", None)
        async with anyio.create_task_group() as tg:
            runner = await start(tg, session.handler, sink)
            await session.handler.send("kept for a resume")
            await other.handler.send("someone else's")
            await sink.wait_chunks(1)
            assert len(store) == 2
            await session.handler.close()
            await runner.done.wait()
            await host.forget(session)
            tg.cancel_scope.cancel()
    assert len(store) == 1
    assert await store.replay(SESSION, "1") is None, "its log is gone"
    assert await store.replay(OTHER, "1") is not None


class _FailingDropStore(InMemoryEventStore):
    async def drop(self, session_id: str) -> None:
        raise StoreError("the store is down")


async def test_forget_logs_a_store_failure_instead_of_raising_it(caplog: pytest.LogCaptureFixture) -> None:
    host = SessionHost(SseConfig(), LocalBackplane(_FailingDropStore()))
    session, _ = host.create(SESSION, "")
    with anyio.fail_after(5):
        await host.forget(session)
    assert [record.getMessage() for record in caplog.records if record.name == "mcp_sse_transport"] == [
        f"session {SESSION[:8]}: the store is down"
    ]


async def test_a_request_whose_delivery_was_cancelled_is_delivered_when_sent_again() -> None:
    """Cancelled while the restored handshake waits for the server: the id it recorded is
    undone, so the client's next POST of it is delivered, not answered 202 as a repeat."""
    host, _ = new_host()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", Restore("2025-06-18"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(host.deliver, session, request_body(1), post_request())
            await anyio.wait_all_tasks_blocked()  # blocked: nobody reads the server's stream yet
            tg.cancel_scope.cancel()
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            assert await host.deliver(session, request_body(1), post_request()) == ACCEPTED
            await server.wait_for(lambda: any(getattr(m, "id", None) == 1 for m in server.messages))
            tg.cancel_scope.cancel()
    assert [getattr(m, "method", None) for m in server.messages] == ["initialize", "notifications/initialized", "ping"]


# -- deliver_message and a front end's Delivery -----------------------------------------------------


class HookedLedger(MemoryRequestLedger):
    """The in-memory ledger with an unanswered hook of its own for each request, as Redis's has."""

    def __init__(self, ran: list[str]) -> None:
        self.ran = ran

    def on_unanswered(self, session: Session, message: types.JSONRPCMessage) -> Callable[[], Awaitable[None]] | None:
        if not isinstance(message, types.JSONRPCRequest):
            return None
        request_id = message.id

        async def unanswered() -> None:
            self.ran.append(f"ledger {request_id}")

        return unanswered


def hooked_host(ran: list[str]) -> SessionHost:
    backplane = LocalBackplane(InMemoryEventStore())
    backplane.ledger = HookedLedger(ran)
    return SessionHost(quiet_config(), backplane)


def recorder(ran: list[str], name: str) -> Callable[[], Awaitable[None]]:
    async def hook() -> None:
        ran.append(name)

    return hook


async def delivered_metadata(
    host: SessionHost, body: bytes, request: Request, delivery: Delivery | None
) -> ServerMessageMetadata:
    """Deliver ``body`` through ``deliver_message``; the metadata the server got with it."""
    session, read_stream = await host.open(SESSION, "", None)
    server = ServerSide(read_stream)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server)
        outcome = await host.deliver_message(session, _sdk.parse(body), body, request, delivery)
        assert outcome is ACCEPTED
        await server.wait_for(lambda: len(server.items) == 1)
        tg.cancel_scope.cancel()
    (item,) = server.items
    assert isinstance(item, SessionMessage)
    assert isinstance(item.metadata, ServerMessageMetadata)
    return item.metadata


@needs_mcp2("on_request_unanswered nor can_send_request on ServerMessageMetadata (1.x answers every request itself)")
async def test_deliver_message_runs_the_ledgers_unanswered_hook_then_the_front_ends() -> None:
    ran: list[str] = []
    request = post_request()
    close_stream, close_standalone = recorder(ran, "close stream"), recorder(ran, "close standalone")
    delivery = Delivery(
        on_unanswered=recorder(ran, "front end"),
        close_stream=close_stream,
        close_standalone=close_standalone,
        can_send_request=False,
    )
    with anyio.fail_after(5):
        meta = await delivered_metadata(hooked_host(ran), request_body(3), request, delivery)
        assert meta.request_context is request
        assert meta.close_sse_stream is close_stream
        assert meta.close_standalone_sse_stream is close_standalone
        assert meta.can_send_request is False
        assert meta.on_request_unanswered is not None
        assert ran == [], "nothing runs until the request settles unanswered"
        await meta.on_request_unanswered()
    assert ran == ["ledger 3", "front end"]


@needs_mcp2("on_request_unanswered nor can_send_request on ServerMessageMetadata (1.x answers every request itself)")
async def test_deliver_message_without_a_ledger_hook_runs_the_front_ends_alone() -> None:
    ran: list[str] = []
    host, _ = new_host()  # the in-memory ledger has no hook
    with anyio.fail_after(5):
        meta = await delivered_metadata(host, request_body(3), post_request(), Delivery(recorder(ran, "front end")))
        assert meta.on_request_unanswered is not None
        await meta.on_request_unanswered()
    assert ran == ["front end"]
    assert meta.can_send_request is True
    assert (meta.close_sse_stream, meta.close_standalone_sse_stream) == (None, None)


@needs_mcp2("on_request_unanswered nor can_send_request on ServerMessageMetadata (1.x answers every request itself)")
async def test_deliver_message_with_no_hook_on_either_side_sets_none() -> None:
    host, _ = new_host()
    with anyio.fail_after(5):
        meta = await delivered_metadata(host, request_body(3), post_request(), Delivery())
    assert meta.on_request_unanswered is None


@needs_mcp2("on_request_unanswered nor can_send_request on ServerMessageMetadata (1.x answers every request itself)")
async def test_deliver_message_without_a_delivery_runs_the_ledgers_hook_only() -> None:
    ran: list[str] = []
    with anyio.fail_after(5):
        meta = await delivered_metadata(hooked_host(ran), request_body("r"), post_request(), None)
        assert meta.on_request_unanswered is not None
        await meta.on_request_unanswered()
    assert ran == ["ledger r"]
    assert meta.can_send_request is True
    assert (meta.close_sse_stream, meta.close_standalone_sse_stream) == (None, None)


async def test_deliver_message_of_a_repeated_request_id_is_repeated_and_not_delivered_again() -> None:
    host, _ = new_host()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", None)
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            body = request_body(1)
            assert await host.deliver_message(session, _sdk.parse(body), body, post_request()) is ACCEPTED
            again = await host.deliver_message(session, _sdk.parse(body), body, post_request(), Delivery())
            assert again is REPEATED
            assert await host.deliver(session, body, post_request()) is REPEATED, "the legacy path too"
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert len(server.items) == 1


async def test_deliver_message_delivers_a_reused_id_anew_when_the_delivery_is_not_once() -> None:
    """Streamable HTTP clients reuse ids once answered: such a front end asks for each delivery."""
    host, _ = new_host()
    with anyio.fail_after(5):
        session, read_stream = await host.open(SESSION, "", None)
        server = ServerSide(read_stream)
        async with anyio.create_task_group() as tg:
            tg.start_soon(server)
            body = request_body(1)
            anew = Delivery(once=False)
            assert await host.deliver_message(session, _sdk.parse(body), body, post_request(), anew) is ACCEPTED
            assert await host.deliver_message(session, _sdk.parse(body), body, post_request(), anew) is ACCEPTED
            await server.wait_for(lambda: len(server.items) == 2)
            tg.cancel_scope.cancel()
    assert [getattr(message, "id", None) for message in server.messages] == [1, 1]
