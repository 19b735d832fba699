"""request_streams: a Streamable HTTP session's streams and where each server message goes.

``SessionStreams`` over real handlers and an in-memory store: routing by answered id and by
related request (a response stream, the standalone stream, a JSON body, nowhere), a stream's
end once answered and its log dropped after ``session_grace``, ``max_session_streams``, the
renewed standalone stream continuing its log, the epilogue a request's stream owes, and the
bookkeeping (``find``, ``waiting``, ``withdraw``, ``unanswered``, ``live``, ``drop_all``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import pytest

from mcp_sse_transport import _sdk
from mcp_sse_transport._sdk import ServerMessageMetadata, SessionMessage, session_message, types
from mcp_sse_transport.errors import ConnectionLostError, ErrorCode
from mcp_sse_transport.handler import SessionHandler
from mcp_sse_transport.ledger import MemoryRequestLedger
from mcp_sse_transport.outbound import CLOSED, ServerWriteStream
from mcp_sse_transport.request_streams import JsonReply, SessionStreams, TooManyStreams, _Nowhere, interrupted
from mcp_sse_transport.session import Session
from mcp_sse_transport.store import BEFORE_FIRST, InMemoryEventStore

from ._handlers import parse, quiet_config
from .test_handler import RecordingSink, start

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
SECRET = "fedcba9876543210fedcba9876543210"


class WatchedStore(InMemoryEventStore):
    """The in-memory store, noting each session whose log was dropped, for a test to wait on."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: list[str] = []
        self._changed = anyio.Event()

    async def drop(self, session_id: str) -> None:
        await super().drop(session_id)
        self.dropped.append(session_id)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_dropped(self, session_id: str) -> None:
        while session_id not in self.dropped:
            await self._changed.wait()

    def holds(self, session_id: str) -> bool:
        return session_id in self._logs


@dataclass
class Rig:
    streams: SessionStreams
    store: WatchedStore
    tg: anyio.abc.TaskGroup

    @property
    def standalone(self) -> SessionHandler:
        return self.streams.standalone


@asynccontextmanager
async def rig(**overrides: object) -> AsyncIterator[Rig]:
    """A session's streams over a watched store; spawned tasks run in a task group cancelled
    when the test's block ends."""
    store = WatchedStore()
    config = quiet_config(**overrides)
    standalone = SessionHandler(SESSION, config, store, secret=SECRET)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            def spawn(task: Callable[[], Coroutine[Any, Any, object]]) -> None:
                tg.start_soon(task)

            yield Rig(SessionStreams(standalone, store, config, spawn), store, tg)
            tg.cancel_scope.cancel()


def response(request_id: types.RequestId) -> SessionMessage:
    return session_message(types.JSONRPCResponse(jsonrpc="2.0", id=request_id, result={}))


def error(request_id: types.RequestId) -> SessionMessage:
    return session_message(_sdk.jsonrpc_error(request_id, "failed", -32000))


def progress(related: types.RequestId | None = None) -> SessionMessage:
    message = types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress", params={"progress": 1})
    if related is None:
        return session_message(message)
    return session_message(message, metadata=ServerMessageMetadata(related_request_id=related))


def server_request(related: types.RequestId | None = None) -> SessionMessage:
    message = types.JSONRPCRequest(jsonrpc="2.0", id=99, method="sampling/createMessage")
    return session_message(message, metadata=ServerMessageMetadata(related_request_id=related))


# -- routing -----------------------------------------------------------------------------------------


async def test_an_answer_goes_to_the_stream_of_the_request_it_answers() -> None:
    async with rig() as r:
        five = r.streams.open(5)
        other = r.streams.open("other")
        assert r.streams.stream_for(response(5)) is five
        assert r.streams.stream_for(error(5)) is five
        assert r.streams.stream_for(response("other")) is other
        assert five is not r.standalone and other is not five


async def test_a_message_related_to_a_request_goes_to_that_requests_stream() -> None:
    async with rig() as r:
        stream = r.streams.open(5)
        assert r.streams.stream_for(progress(related=5)) is stream
        assert r.streams.stream_for(server_request(related=5)) is stream, "the server's own request too"


async def test_a_message_related_to_no_request_goes_to_the_standalone_stream() -> None:
    async with rig() as r:
        r.streams.open(5)
        assert r.streams.stream_for(progress()) is r.standalone, "no metadata"
        assert r.streams.stream_for(server_request(related=None)) is r.standalone, "metadata naming no request"


async def test_int_and_str_ids_with_the_same_text_are_different_requests() -> None:
    async with rig() as r:
        seven = r.streams.open(7)
        text = r.streams.open("7")
        assert r.streams.stream_for(response(7)) is seven
        assert r.streams.stream_for(response("7")) is text
        assert r.streams.stream_for(progress(related="7")) is text


async def test_an_answer_or_related_message_for_an_unknown_or_answered_request_goes_nowhere() -> None:
    async with rig() as r:
        answered = r.streams.open(4)
        r.streams.answered(4, answered)
        r.streams.open(5)
        for item in (response(6), error("x"), progress(related=6), server_request(related=6), progress(related=4)):
            stream = r.streams.stream_for(item)
            assert isinstance(stream, _Nowhere)
            assert stream.tag == r.standalone.tag
            await stream.send(b"dropped")  # dropped without a word
            await stream.flush()
        assert r.standalone.statistics().buffered_events == 0


async def test_messages_for_a_stream_that_broke_before_its_answer_get_its_error() -> None:
    """Whoever still writes for a request whose stream was cut loose learns the client is gone."""
    async with rig() as r:
        stream = r.streams.open(5)
        stream.abort("its connection dropped")
        for item in (progress(related=5), server_request(related=5), response(5)):
            assert r.streams.stream_for(item) is stream
        with pytest.raises(ConnectionLostError):
            await r.streams.stream_for(progress(related=5)).send(b"progress")


async def test_unrelated_messages_get_the_error_of_a_standalone_stream_that_broke() -> None:
    async with rig() as r:
        r.standalone.abort("cut loose")
        assert r.streams.stream_for(progress()) is r.standalone
        with pytest.raises(ConnectionLostError):
            await r.streams.stream_for(progress()).send(b"notification")


async def test_a_json_reply_is_where_its_requests_answer_goes() -> None:
    async with rig() as r:
        reply = r.streams.open_json(3)
        assert isinstance(reply, JsonReply)
        assert reply.tag == r.standalone.tag
        assert r.streams.stream_for(response(3)) is reply
        assert r.streams.stream_for(error(3)) is reply
        assert r.streams.waiting(3)
        assert len(r.streams) == 0, "a JSON body is no stream: it takes no room under max_session_streams"


async def test_a_json_requests_own_notifications_and_requests_go_nowhere() -> None:
    """A JSON body has room for the answer only."""
    async with rig() as r:
        r.streams.open_json(3)
        assert isinstance(r.streams.stream_for(progress(related=3)), _Nowhere)
        assert isinstance(r.streams.stream_for(server_request(related=3)), _Nowhere)


async def test_a_json_reply_takes_the_first_message_only() -> None:
    with anyio.fail_after(5):
        reply = JsonReply("tag")
        assert reply.body is None and not reply.ready.is_set()
        await reply.send(b"ignored", event="error")
        await reply.send(b"ignored", event=None)
        assert reply.body is None and not reply.ready.is_set(), "only a message event becomes the body"
        await reply.send('{"first":true}')
        assert reply.body == b'{"first":true}', "str is encoded"
        assert reply.ready.is_set()
        await reply.send(b'{"second":true}')
        await reply.flush()
        assert reply.body == b'{"first":true}'


async def test_a_json_request_gets_its_answer_as_the_body_not_its_own_notifications() -> None:
    """A JSON body carries the answer only: a progress notification the server sends for the
    request first is dropped (the SDK's JSON mode drops it too), it does not become the body."""
    async with rig() as r:
        inbound, read_stream = _sdk.server_streams()
        session = Session(r.standalone, inbound, "")
        session.routing = r.streams
        reply = r.streams.open_json(3)
        writer = ServerWriteStream(session, r.tg, MemoryRequestLedger())
        await writer.send(progress(related=3))
        answer = types.JSONRPCResponse(jsonrpc="2.0", id=3, result={"answer": 42})
        await writer.send(session_message(answer))
        assert reply.ready.is_set()
        assert reply.body is not None
        assert _sdk.parse(reply.body) == answer
        assert not r.streams.waiting(3)
        inbound.close()
        read_stream.close()


# -- answered ----------------------------------------------------------------------------------------


async def test_an_answered_stream_drains_ends_and_stays_resumable() -> None:
    async with rig() as r:
        stream = r.streams.open(5)
        sink = RecordingSink()
        runner = await start(r.tg, stream, sink)
        await stream.send(_sdk.serialize(_sdk.message_of(progress(related=5))))
        await stream.send(_sdk.serialize(_sdk.message_of(response(5))))
        r.streams.answered(5, stream)
        assert not r.streams.waiting(5)
        assert stream.epilogue is None
        await runner.done.wait()
        assert runner.graceful is True, "drained and closed: the response ends cleanly"
        assert [json.loads(event.data).get("id") for event in parse(sink.data)] == [None, 5]
        # Within session_grace (a minute here) the stream can still be found and replayed.
        await anyio.wait_all_tasks_blocked()
        assert r.streams.find(stream.session_id) is stream
        assert len(r.streams) == 1
        replay = await r.store.replay(stream.session_id, BEFORE_FIRST)
        assert replay is not None and len(replay.events) == 2


async def test_an_answered_stream_is_dropped_after_session_grace() -> None:
    async with rig(session_grace=0.05) as r:
        stream = r.streams.open(5)
        runner = await start(r.tg, stream, RecordingSink())
        await stream.send(b"answer")
        assert r.store.holds(stream.session_id)
        r.streams.answered(5, stream)
        await runner.done.wait()
        await r.store.wait_dropped(stream.session_id)
        assert stream.ended and not stream.failed
        assert not r.store.holds(stream.session_id)
        assert r.streams.find(stream.session_id) is None
        assert len(r.streams) == 0
        assert SESSION not in r.store.dropped, "the standalone stream's log stays"


async def test_answered_with_a_stream_other_than_the_requests_changes_nothing() -> None:
    async with rig() as r:
        stream = r.streams.open(5)
        r.streams.answered(5, r.standalone)
        r.streams.answered(6, stream)  # no such request
        await anyio.wait_all_tasks_blocked()
        assert r.streams.waiting(5)
        assert not stream.ended
        assert stream.epilogue == interrupted(5)


async def test_answering_a_json_reply_forgets_the_request() -> None:
    async with rig() as r:
        reply = r.streams.open_json("j")
        await reply.send(b"{}")
        r.streams.answered("j", reply)
        assert not r.streams.waiting("j")
        assert r.streams.unanswered() == []


async def test_a_request_whose_stream_broke_is_not_waiting_once_its_answer_came() -> None:
    """The server answered a request whose response stream had been cut loose: the answer
    cannot reach the client, and the request is no longer waiting (nor listed to be answered at
    the session's end), so its id is free again and nothing is kept for it but the stream's
    log, for a resume."""
    async with rig() as r:
        inbound, read_stream = _sdk.server_streams()
        session = Session(r.standalone, inbound, "")
        session.routing = r.streams
        stream = r.streams.open(5)
        stream.abort("cut loose")
        writer = ServerWriteStream(session, r.tg, MemoryRequestLedger())
        with suppress(*CLOSED):  # the stream's error, as the server sees it
            await writer.send(response(5))
        assert not r.streams.waiting(5)
        assert r.streams.unanswered() == []
        inbound.close()
        read_stream.close()


# -- the epilogue ----------------------------------------------------------------------------------


async def test_a_requests_stream_owes_an_interrupted_answer_until_answered() -> None:
    async with rig() as r:
        stream = r.streams.open("req-1")
        assert stream.epilogue == interrupted("req-1")
        r.streams.answered("req-1", stream)
        assert stream.epilogue is None


def test_interrupted_is_a_jsonrpc_error_message_event_for_the_request() -> None:
    (event,) = parse(interrupted(7))
    assert event.event == "message"
    assert event.id == "", "no id: nothing to resume after it"
    body = json.loads(event.data)
    assert body["id"] == 7
    assert body["error"]["code"] == ErrorCode.REQUEST_INTERRUPTED
    assert "may or may not have taken effect" in body["error"]["message"]


# -- max_session_streams -------------------------------------------------------------------------


async def test_too_many_streams_when_every_one_is_live() -> None:
    async with rig(max_session_streams=2) as r:
        r.streams.open(1)
        r.streams.open(2)
        with pytest.raises(TooManyStreams):
            r.streams.open(3)
        assert len(r.streams) == 2
        assert not r.streams.waiting(3), "a refused request is not registered"


async def test_the_oldest_ended_stream_is_forgotten_for_a_new_one() -> None:
    async with rig(max_session_streams=3) as r:
        live = r.streams.open(1)
        older = r.streams.open(2)
        newer = r.streams.open(3)
        for stream in (older, newer):
            await stream.send(b"kept")
        newer.abort("ended first, but opened later")
        older.abort("ended next")
        fourth = r.streams.open(4)
        assert r.streams.find(older.session_id) is None, "the oldest ended one goes"
        assert r.streams.find(newer.session_id) is newer
        assert r.streams.find(live.session_id) is live
        assert r.streams.find(fourth.session_id) is fourth
        assert len(r.streams) == 3
        await r.store.wait_dropped(older.session_id)
        assert not r.store.holds(older.session_id)
        assert r.store.holds(newer.session_id)


async def test_no_cap_on_streams_with_max_session_streams_none() -> None:
    async with rig(max_session_streams=None) as r:
        for request_id in range(150):
            r.streams.open(request_id)
        assert len(r.streams) == 150


# -- the standalone stream -----------------------------------------------------------------------


async def test_a_renewed_standalone_stream_continues_the_log_of_the_old_one() -> None:
    async with rig() as r:
        old = r.standalone
        await old.send("e1")
        await old.send("e2")
        old.abort("cut loose while nobody read it")
        renewed = r.streams.renew_standalone()
        assert r.streams.standalone is renewed is not old
        assert (renewed.session_id, renewed.secret) == (SESSION, SECRET)
        assert renewed.last_token == old.last_token == "2"
        assert r.streams.find(SESSION) is renewed
        await renewed.send("e3")
        sink = RecordingSink()
        runner = await start(r.tg, renewed, sink, after="1")  # the client saw e1 only
        assert r.streams.stream_for(progress()) is renewed, "unrelated messages reach the new stream"
        await renewed.close()
        await runner.done.wait()
        events = parse(sink.data)
        assert [event.data for event in events] == ["e2", "e3"]
        assert [event.id for event in events] == [f"{SESSION}.{SECRET}:2", f"{SESSION}.{SECRET}:3"]


# -- bookkeeping ---------------------------------------------------------------------------------


async def test_find_names_the_standalone_stream_by_the_sessions_id_and_others_by_theirs() -> None:
    async with rig() as r:
        stream = r.streams.open(1)
        assert r.streams.find(SESSION) is r.standalone
        assert r.streams.find(stream.session_id) is stream
        assert r.streams.find("f" * 32) is None
        assert stream.session_id != SESSION
        assert stream.secret == SECRET, "one resume secret for all the session's streams"


async def test_waiting_is_true_from_open_until_answered_or_withdrawn() -> None:
    async with rig() as r:
        assert not r.streams.waiting(1)
        stream = r.streams.open(1)
        reply = r.streams.open_json(2)
        assert r.streams.waiting(1) and r.streams.waiting(2)
        assert not r.streams.waiting("1")
        r.streams.answered(1, stream)
        r.streams.withdraw(2, reply)
        assert not r.streams.waiting(1) and not r.streams.waiting(2)


async def test_withdraw_forgets_a_json_request() -> None:
    async with rig() as r:
        reply = r.streams.open_json(1)
        r.streams.withdraw(1, reply)
        assert r.streams.unanswered() == []
        assert isinstance(r.streams.stream_for(response(1)), _Nowhere)


async def test_withdraw_with_another_reply_keeps_the_request() -> None:
    """A withdrawn POST's reply is not the one a later request of the id opened."""
    async with rig() as r:
        first = r.streams.open_json(1)
        r.streams.withdraw(1, first)
        second = r.streams.open_json(1)
        r.streams.withdraw(1, first)
        assert r.streams.waiting(1)
        assert r.streams.stream_for(response(1)) is second


async def test_unanswered_lists_every_request_still_waiting() -> None:
    async with rig() as r:
        stream = r.streams.open(1)
        reply = r.streams.open_json("j")
        ended = r.streams.open(2)
        ended.abort("gone")
        assert r.streams.unanswered() == [(1, stream), ("j", reply), (2, ended)]


async def test_drop_all_drops_every_response_streams_log_but_not_the_sessions() -> None:
    async with rig() as r:
        streams = [r.streams.open(n) for n in range(3)]
        for stream in streams:
            await stream.send(b"x")
        await r.standalone.send(b"y")
        await r.streams.drop_all()
        assert len(r.streams) == 0
        assert sorted(r.store.dropped) == sorted(stream.session_id for stream in streams)
        assert r.store.holds(SESSION), "the session's own log is the host's to forget"


async def test_retire_drops_an_ended_stream_after_session_grace() -> None:
    async with rig(session_grace=0.05) as r:
        stream = r.streams.open(1)
        await stream.send(b"x")
        stream.abort("cut loose")
        r.tg.start_soon(r.streams.retire, stream)
        await r.store.wait_dropped(stream.session_id)
        assert r.streams.find(stream.session_id) is None


async def test_open_streams_lists_the_streams_not_ended_the_standalone_first() -> None:
    async with rig() as r:
        stream = r.streams.open(1)
        ended = r.streams.open(2)
        ended.abort("gone")
        assert r.streams.open_streams() == [r.standalone, stream]
        r.standalone.abort("gone")
        assert r.streams.open_streams() == [stream]


async def test_a_stream_answered_while_the_server_shuts_down_ends_with_the_shutdown_event() -> None:
    async with rig() as r:
        stream = r.streams.open(1)
        sink = RecordingSink()
        runner = await start(r.tg, stream, sink)
        r.streams.shutting_down = True
        await stream.send(_sdk.serialize(_sdk.message_of(response(1))))
        r.streams.answered(1, stream)
        await runner.done.wait()
        assert runner.graceful is True
        events = parse(sink.data)
        assert [event.event for event in events] == ["message", "error"]
        assert json.loads(events[-1].data)["code"] == ErrorCode.SERVER_SHUTDOWN
