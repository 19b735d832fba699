"""What an SDK server writes, through ``outbound.ServerWriteStream``: one event per message on the
stream the session's routing picks; the replayed ``initialize``'s response swallowed; a message
that cannot be sent reported (an error event, an answer to whoever waits); and the reports of a
POST that cannot be parsed or whose id is too long. Real handlers, written to recording sinks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import pytest

from mcp_sse_transport import _sdk
from mcp_sse_transport._sdk import ContextReceiveStream, SessionMessage, ValidationError, session_message, types
from mcp_sse_transport.errors import ErrorCode, SessionClosedError
from mcp_sse_transport.handler import SessionHandler
from mcp_sse_transport.ledger import MemoryRequestLedger
from mcp_sse_transport.outbound import ServerWriteStream, id_too_long_error, report_id_too_long, report_parse_error
from mcp_sse_transport.session import OneStream, Session, Stream

from ._handlers import parse, quiet_config
from ._sdk_compat import httpx as httpx2
from .test_handler import RecordingSink, start

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


class RecordingLedger(MemoryRequestLedger):
    """The in-memory ledger, noting which answers the server sent, into which stream."""

    def __init__(self) -> None:
        self.answers: list[tuple[Stream, types.RequestId]] = []

    async def answered(self, session: Session, stream: Stream, request_id: types.RequestId) -> None:
        self.answers.append((stream, request_id))


@dataclass
class Rig:
    session: Session
    read_stream: ContextReceiveStream[SessionMessage | Exception]
    sink: RecordingSink
    tg: anyio.abc.TaskGroup
    ledger: RecordingLedger = field(default_factory=RecordingLedger)

    @property
    def handler(self) -> SessionHandler:
        return self.session.handler

    def writer(self) -> ServerWriteStream:
        return ServerWriteStream(self.session, self.tg, self.ledger)


async def events(sink: RecordingSink, count: int) -> list[httpx2.ServerSentEvent]:
    """Wait until the sink got ``count`` events; all it got."""
    await sink.wait_for(lambda: len(parse(sink.data)) >= count)
    return parse(sink.data)


async def settled_events(sink: RecordingSink) -> list[httpx2.ServerSentEvent]:
    """Every event the sink got once every task is blocked: for asserting what did not come."""
    await anyio.wait_all_tasks_blocked()
    return parse(sink.data)


@asynccontextmanager
async def rig(**overrides: object) -> AsyncIterator[Rig]:
    """A session whose handler writes to a recording sink, inside a task group for the reports."""
    inbound, read_stream = _sdk.server_streams()
    handler = SessionHandler(SESSION, quiet_config(**overrides))
    sink = RecordingSink()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            runner = await start(tg, handler, sink)
            assert handler.attached
            try:
                yield Rig(Session(handler, inbound, ""), read_stream, sink, tg)
            finally:
                await handler.close()
                await runner.done.wait()
                inbound.close()
                read_stream.close()


def _json(event: httpx2.ServerSentEvent) -> Any:
    return json.loads(event.data)


def _request(request_id: types.RequestId = 5, **params: Any) -> types.JSONRPCRequest:
    return types.JSONRPCRequest(jsonrpc="2.0", id=request_id, method="sampling/createMessage", params=params or None)


# -- send ----------------------------------------------------------------------------------------


async def test_send_writes_a_message_as_one_event() -> None:
    async with rig() as r:
        message = types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress", params={"progress": 1})
        await r.writer().send(session_message(message))
        [event] = await events(r.sink, 1)
        assert event.event == "message"
        assert _sdk.parse(event.data) == message
        assert event.id.startswith(f"{SESSION}.")
        assert r.session.exchanged, "the server sent a message: the session is no probe"


async def test_send_notes_a_response_in_the_ledger() -> None:
    async with rig() as r:
        await r.writer().send(session_message(types.JSONRPCResponse(jsonrpc="2.0", id=9, result={})))
        await r.writer().send(session_message(_sdk.jsonrpc_error("e", "no", -1)))
        await r.writer().send(session_message(_request(1)))
        await events(r.sink, 3)
        assert r.ledger.answers == [(r.handler, 9), (r.handler, "e")], "responses and errors only"


async def test_send_goes_to_the_stream_the_routing_picks() -> None:
    other = SessionHandler(OTHER, quiet_config())
    other_sink = RecordingSink()
    async with rig() as r:
        other_runner = await start(r.tg, other, other_sink)
        r.session.routing = OneStream(other)
        response = types.JSONRPCResponse(jsonrpc="2.0", id=3, result={"content": []})
        await r.writer().send(session_message(response))
        [event] = await events(other_sink, 1)
        assert _sdk.parse(event.data) == response
        assert event.id.startswith(f"{OTHER}.")
        assert await settled_events(r.sink) == [], "nothing on the session's first stream"
        assert r.handler.statistics().buffered_events == 0
        assert r.ledger.answers == [(other, 3)], "the answer is noted for the stream it went to"
        await other.close()
        await other_runner.done.wait()


async def test_the_swallowed_response_is_dropped_once() -> None:
    async with rig() as r:
        restored, _ = _sdk.restored_handshake("2025-06-18")
        r.session.swallow = restored.id
        swallowed = types.JSONRPCResponse(jsonrpc="2.0", id=restored.id, result={"protocolVersion": "2025-06-18"})
        await r.writer().send(session_message(swallowed))
        assert r.session.swallow is None
        assert await settled_events(r.sink) == []
        assert r.ledger.answers == [], "the client never asked: nothing to strike off"
        await r.writer().send(session_message(swallowed))
        [event] = await events(r.sink, 1)
        assert _sdk.parse(event.data) == swallowed, "only once"


async def test_a_response_to_another_id_keeps_the_swallow() -> None:
    async with rig() as r:
        r.session.swallow = "mcp-sse-transport/restore"
        await r.writer().send(session_message(types.JSONRPCResponse(jsonrpc="2.0", id=1, result={})))
        [event] = await events(r.sink, 1)
        assert _json(event)["id"] == 1
        assert r.session.swallow == "mcp-sse-transport/restore"


async def test_a_request_with_the_swallowed_id_is_not_swallowed() -> None:
    async with rig() as r:
        r.session.swallow = 5
        await r.writer().send(session_message(_request(5)))
        [event] = await events(r.sink, 1)
        assert _json(event)["method"] == "sampling/createMessage"
        assert r.session.swallow == 5


async def test_send_into_an_ended_session_raises_closed() -> None:
    """What the SDK expects of a write stream whose session is gone."""
    inbound, read_stream = _sdk.server_streams()
    handler = SessionHandler(SESSION, quiet_config())
    await handler.close()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            writer = ServerWriteStream(Session(handler, inbound, ""), tg, MemoryRequestLedger())
            with pytest.raises(SessionClosedError):
                await writer.send(session_message(_request(1)))
    inbound.close()
    read_stream.close()


async def test_aclose_closes_the_sessions_first_stream() -> None:
    async with rig() as r:
        async with r.writer():
            assert not r.handler.ended
        assert r.handler.ended


# -- messages that cannot be sent ----------------------------------------------------------------


async def test_an_unserializable_response_gets_an_error_event_and_a_jsonrpc_error() -> None:
    async with rig() as r:
        response = types.JSONRPCResponse(jsonrpc="2.0", id=4, result={"x": object()})
        await r.writer().send(session_message(response))
        error, answer = await events(r.sink, 2)
        assert error.event == "error"
        assert _json(error) == {
            "code": ErrorCode.INTERNAL_ERROR,
            "message": "Outbound message could not be serialized",
            "data": {"id": 4},
        }
        assert answer.event == "message"
        parsed = _sdk.parse(answer.data)
        assert isinstance(parsed, types.JSONRPCError)
        assert (parsed.id, parsed.error.code) == (4, ErrorCode.INTERNAL_ERROR)
        assert parsed.error.message == "Response could not be serialized"
        assert r.ledger.answers == [(r.handler, 4)], "answered: with the error"
        assert await settled_events(r.sink) == [error, answer]


async def test_a_response_over_max_event_bytes_gets_message_too_large() -> None:
    async with rig(max_event_bytes=256) as r:
        response = types.JSONRPCResponse(jsonrpc="2.0", id="big", result={"text": "x" * 1000})
        size = len(_sdk.serialize(response))
        await r.writer().send(session_message(response))
        error, answer = await events(r.sink, 2)
        assert error.event == "error"
        assert _json(error) == {
            "code": ErrorCode.MESSAGE_TOO_LARGE,
            "message": "Outbound message is too large",
            "data": {"id": "big", "size": size, "max_event_bytes": 256},
        }
        parsed = _sdk.parse(answer.data)
        assert isinstance(parsed, types.JSONRPCError)
        assert (parsed.id, parsed.error.code) == ("big", ErrorCode.MESSAGE_TOO_LARGE)
        assert parsed.error.message == "Response is too large"
        assert not r.handler.ended, "the session goes on"
        await r.writer().send(session_message(types.JSONRPCResponse(jsonrpc="2.0", id="small", result={})))
        assert _json((await events(r.sink, 3))[2])["id"] == "small"


async def test_an_unserializable_error_is_sent_without_its_data() -> None:
    async with rig() as r:
        error = types.JSONRPCError(
            jsonrpc="2.0", id=6, error=types.ErrorData(code=-32000, message="tool failed", data={"x": object()})
        )
        await r.writer().send(session_message(error))
        report, answer = await events(r.sink, 2)
        assert report.event == "error"
        assert _json(report)["code"] == ErrorCode.INTERNAL_ERROR
        assert _json(answer) == {"jsonrpc": "2.0", "id": 6, "error": {"code": -32000, "message": "tool failed"}}


async def test_an_unsendable_notification_gets_an_error_event_naming_its_method() -> None:
    async with rig(max_event_bytes=256) as r:
        message = types.JSONRPCNotification(jsonrpc="2.0", method="notifications/message", params={"x": "y" * 500})
        await r.writer().send(session_message(message))
        [error] = await events(r.sink, 1)
        assert error.event == "error"
        body = _json(error)
        assert body["code"] == ErrorCode.MESSAGE_TOO_LARGE
        assert body["data"]["method"] == "notifications/message"
        assert "id" not in body["data"]
        assert await settled_events(r.sink) == [error], "nobody waits for a notification"


@pytest.mark.parametrize(
    ("overrides", "params", "code"),
    [
        ({}, {"x": object()}, ErrorCode.INTERNAL_ERROR),
        ({"max_event_bytes": 256}, {"x": "y" * 500}, ErrorCode.MESSAGE_TOO_LARGE),
    ],
)
async def test_an_unsendable_request_is_answered_to_the_server(
    overrides: dict[str, object], params: dict[str, Any], code: ErrorCode
) -> None:
    async with rig(**overrides) as r:
        await r.writer().send(session_message(_request(8, **params)))
        [error] = await events(r.sink, 1)
        assert error.event == "error"
        body = _json(error)
        assert body["code"] == code
        assert (body["data"]["id"], body["data"]["method"]) == (8, "sampling/createMessage")
        item = await r.read_stream.receive()
        assert isinstance(item, SessionMessage)
        answer = _sdk.message_of(item)
        assert isinstance(answer, types.JSONRPCError)
        assert (answer.id, answer.error.code) == (8, code)
        assert answer.error.message.startswith("Request ")
        assert await settled_events(r.sink) == [error], "the client gets the error event only"
        assert r.ledger.answers == []


async def test_reports_into_an_ended_session_do_not_raise() -> None:
    inbound, read_stream = _sdk.server_streams()
    read_stream.close()  # the server run ended too
    handler = SessionHandler(SESSION, quiet_config(max_event_bytes=256))
    await handler.close()
    session = Session(handler, inbound, "")
    with pytest.raises(ValidationError) as invalid:
        _sdk.parse(b'{"jsonrpc":"2.0","id":1,"method":2}')
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            writer = ServerWriteStream(session, tg, MemoryRequestLedger())
            await writer.send(session_message(types.JSONRPCResponse(jsonrpc="2.0", id=1, result={"x": object()})))
            await writer.send(session_message(types.JSONRPCResponse(jsonrpc="2.0", id=2, result={"x": "y" * 500})))
            await writer.send(session_message(_request(3, x=object())))
            await report_parse_error(session, b'{"jsonrpc":"2.0","id":1,"method":2}', invalid.value)
            await report_id_too_long(session)
    assert handler.statistics().buffered_events == 0
    inbound.close()


# -- reports of a POST ---------------------------------------------------------------------------


async def _report_parse_error(r: Rig, body: bytes) -> Exception:
    """``report_parse_error`` for ``body``, with the server reading its read stream; what it read."""
    with pytest.raises(ValidationError) as invalid:
        _sdk.parse(body)
    received: list[SessionMessage | Exception] = []

    async def read() -> None:
        received.append(await r.read_stream.receive())

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        await report_parse_error(r.session, body, invalid.value)
    [item] = received
    assert isinstance(item, Exception)
    assert item is invalid.value, "the server gets the error, as stock does"
    return item


@pytest.mark.parametrize("request_id", ["abc", 12])
async def test_a_parse_error_naming_an_id_gets_an_error_event_and_invalid_request(request_id: str | int) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": 42}).encode()
    async with rig() as r:
        await _report_parse_error(r, body)
        error, answer = await events(r.sink, 2)
        assert error.event == "error"
        assert _json(error) == {
            "code": ErrorCode.PARSE_ERROR,
            "message": "Could not parse message",
            "data": {"id": request_id},
        }
        assert answer.event == "message"
        assert _json(answer) == {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": ErrorCode.INVALID_REQUEST, "message": "Invalid request"},
        }


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'["a", "batch"]',
        b'{"jsonrpc":"2.0","id":3}',  # no method: not a request
        b'{"jsonrpc":"2.0","id":null,"method":1}',
        b'{"jsonrpc":"2.0","id":[1],"method":1}',
        b'{"jsonrpc":"2.0","id":true,"method":1}',
    ],
)
async def test_a_parse_error_naming_no_id_gets_the_error_event_only(body: bytes) -> None:
    async with rig() as r:
        await _report_parse_error(r, body)
        [error] = await events(r.sink, 1)
        assert error.event == "error"
        assert _json(error) == {"code": ErrorCode.PARSE_ERROR, "message": "Could not parse message"}
        assert await settled_events(r.sink) == [error]


async def test_report_id_too_long_puts_the_error_on_the_stream() -> None:
    async with rig(max_request_id_bytes=64) as r:
        await report_id_too_long(r.session)
        [error] = await events(r.sink, 1)
        assert error.event == "error"
        assert _json(error) == {
            "code": ErrorCode.INVALID_REQUEST,
            "message": "Request id too long",
            "data": {"max_request_id_bytes": 64},
        }
        assert error.data == id_too_long_error(64)
