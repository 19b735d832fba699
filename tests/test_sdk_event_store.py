"""Our event store as the SDK's, one per session, under the SDK's own session manager.

The adapter alone: ids are ``<key>.<secret>:<token>``, a key per (session, SDK stream); a replay
sends the events after the id of its own stream, in order, priming events stored but never sent;
a malformed, forged or foreign id replays nothing; trimmed events are skipped, not a crash. Then
the stock manager on a real uvicorn: a POST response stream cut mid-call resumes by
``Last-Event-ID`` with what it missed, once, in order (raw HTTP and the SDK's client); an id of
one session replays nothing on another (which, with one SDK-style store shared the stock way, it
does); a session that ends drops its events from the store.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import anyio
import pytest
from mcp.server.streamable_http import EventCallback, EventMessage
from mcp.server.streamable_http import EventStore as SdkEventStore
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.routing import Route

from mcp_sse_transport import (
    InMemoryEventStore,
    Replay,
    SessionScopedEventStore,
    _sdk,
    format_event_id,
    parse_event_id,
    scoped_stock_manager,
)
from mcp_sse_transport.redis_store import RedisEventStore

from ._sdk_compat import Client, Context, MCPServer, StreamableHTTPASGIApp, lowlevel_of, streamable_http_client, types
from ._sdk_compat import httpx as httpx2
from ._streamable import headers as _headers
from ._streamable import message as _message
from ._streamable import open_session as _open_session
from ._support import CuttingProxy, RawSseStream, SseEvent, serving

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not hasattr(_sdk.StockSessionManager, "_admit_session"),
        reason="this mcp's session manager has no per-session admission to hook (1.28 on); "
        "test_sdk's test_a_store_per_session_needs_a_manager_that_admits_sessions covers the refusal",
    ),
]

GET_STREAM = "_GET_stream"


def _progress(n: int) -> types.JSONRPCNotification:
    params = {"progressToken": 1, "progress": n}
    return types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress", params=params)


async def _replayed(adapter: SessionScopedEventStore, last_event_id: str) -> tuple[str | None, list[EventMessage]]:
    sent: list[EventMessage] = []

    async def send(message: EventMessage) -> None:
        sent.append(message)

    return await adapter.replay_events_after(last_event_id, send), sent


def _progress_values(sent: list[EventMessage]) -> list[Any]:
    return [message.message.model_dump()["params"]["progress"] for message in sent]


# -- the adapter -----------------------------------------------------------------------------------


async def test_each_stream_of_a_session_has_a_key_of_its_own_and_ids_no_one_could_guess() -> None:
    store = InMemoryEventStore()
    adapter = SessionScopedEventStore(store, uuid4().hex)
    with anyio.fail_after(5):
        first = [await adapter.store_event("1", _progress(n)) for n in range(2)]
        other = await adapter.store_event(GET_STREAM, _progress(9))
    parsed = [parse_event_id(event_id) for event_id in [*first, other]]
    assert all(p is not None for p in parsed)
    one, two, get = (p for p in parsed if p is not None)
    assert one.session_id == two.session_id != get.session_id  # the key: one per stream
    assert one.secret == two.secret != get.secret
    assert [one.token, two.token, get.token] == ["1", "2", "1"]  # our store's tokens, per key
    assert len(store) == 2 and adapter.streams == 2
    assert SessionScopedEventStore(store)  # the SDK tests its store for truth: never an empty one


async def test_replay_sends_the_events_after_the_id_in_order_skipping_priming_events() -> None:
    """Read from the store two at a time (``replay_batch``), primings (``None``) among the
    messages: every message after the id, once, oldest first, each with its own id."""
    adapter = SessionScopedEventStore(InMemoryEventStore(), replay_batch=2)
    with anyio.fail_after(5):
        priming = await adapter.store_event("7", None)
        ids = [await adapter.store_event("7", _progress(n)) for n in range(3)]
        await adapter.store_event("7", None)  # a resumed stream's priming
        ids += [await adapter.store_event("7", _progress(n)) for n in range(3, 6)]
        await adapter.store_event("8", _progress(99))  # another stream of the session

        stream_id, sent = await _replayed(adapter, priming)
        assert stream_id == "7"
        assert _progress_values(sent) == [0, 1, 2, 3, 4, 5]
        assert [message.event_id for message in sent] == ids

        stream_id, sent = await _replayed(adapter, ids[2])
        assert stream_id == "7" and _progress_values(sent) == [3, 4, 5]
        stream_id, sent = await _replayed(adapter, ids[-1])  # the newest: a valid resume point
        assert stream_id == "7" and sent == []


async def test_malformed_forged_and_foreign_ids_replay_nothing() -> None:
    store = InMemoryEventStore()
    adapter = SessionScopedEventStore(store, uuid4().hex)
    other_session = SessionScopedEventStore(store, uuid4().hex)
    with anyio.fail_after(5):
        mine = await adapter.store_event(GET_STREAM, None)
        await adapter.store_event(GET_STREAM, _progress(1))
        theirs = await other_session.store_event(GET_STREAM, None)
        await other_session.store_event(GET_STREAM, _progress(2))
        parsed = parse_event_id(mine)
        assert parsed is not None
        refused = [
            "",
            "not an id",
            f"{parsed.session_id}:{parsed.token}",  # no secret
            format_event_id(parsed.session_id, parsed.token, "0" * 32),  # a forged secret
            format_event_id(uuid4().hex, parsed.token, parsed.secret),  # a key of no stream
            format_event_id(parsed.session_id, "99", parsed.secret),  # a token never issued
            format_event_id(parsed.session_id, "1x", parsed.secret),  # not a token of the store
            theirs,  # the same SDK stream id, in another session
            mine + "\n",
        ]
        for event_id in refused:
            assert await _replayed(adapter, event_id) == (None, []), event_id
        stream_id, sent = await _replayed(other_session, theirs)  # theirs, on their own
        assert stream_id == GET_STREAM and _progress_values(sent) == [2]
        stream_id, sent = await _replayed(adapter, mine)
        assert stream_id == GET_STREAM and _progress_values(sent) == [1]


async def test_events_the_store_trimmed_are_skipped_and_the_rest_replayed() -> None:
    now = [0.0]
    store = InMemoryEventStore(max_events=3, max_age=10, clock=lambda: now[0])
    adapter = SessionScopedEventStore(store)
    with anyio.fail_after(5):
        priming = await adapter.store_event("1", None)
        for n in range(6):
            await adapter.store_event("1", _progress(n))
        stream_id, sent = await _replayed(adapter, priming)
        assert stream_id == "1" and _progress_values(sent) == [3, 4, 5]  # 0 to 2 trimmed by count

        now[0] = 60.0  # all of them, by age
        stream_id, sent = await _replayed(adapter, priming)
        assert stream_id == "1" and sent == []
        live = await adapter.store_event("1", _progress(6))
        stream_id, sent = await _replayed(adapter, priming)
        assert stream_id == "1" and _progress_values(sent) == [6]
        assert await _replayed(adapter, live) == ("1", [])


async def test_past_max_streams_the_least_recently_used_stream_is_forgotten_and_dropped() -> None:
    store = InMemoryEventStore()
    adapter = SessionScopedEventStore(store, max_streams=2)
    with anyio.fail_after(5):
        get = await adapter.store_event(GET_STREAM, None)
        one = await adapter.store_event("1", None)
        await adapter.store_event(GET_STREAM, _progress(0))  # the GET stream is used again
        await adapter.store_event("2", None)  # evicts "1", the least recently used
        assert adapter.streams == 2 and len(store) == 2
        assert await _replayed(adapter, one) == (None, [])
        stream_id, sent = await _replayed(adapter, get)
        assert stream_id == GET_STREAM and _progress_values(sent) == [0]


async def test_a_closed_adapter_drops_its_events_and_stores_no_more() -> None:
    store = InMemoryEventStore()
    adapter = SessionScopedEventStore(store)
    with anyio.fail_after(5):
        before = await adapter.store_event("1", _progress(0))
        await adapter.store_event(GET_STREAM, None)
        await adapter.aclose()
        assert adapter.closed and adapter.streams == 0 and len(store) == 0
        after = await adapter.store_event("1", _progress(1))
        assert parse_event_id(after) is not None and len(store) == 0
        assert await _replayed(adapter, before) == (None, [])
        assert await _replayed(adapter, after) == (None, [])
        await adapter.aclose()  # again: nothing to do


async def test_over_redis_primings_and_messages_resume_the_same(redis_client: Redis, redis_prefix: str) -> None:
    adapter = SessionScopedEventStore(RedisEventStore(redis_client, prefix=redis_prefix), replay_batch=2)
    with anyio.fail_after(10):
        priming = await adapter.store_event("1", None)
        ids = [await adapter.store_event("1", _progress(n)) for n in range(5)]
        stream_id, sent = await _replayed(adapter, priming)
        assert stream_id == "1" and _progress_values(sent) == [0, 1, 2, 3, 4]
        assert [message.event_id for message in sent] == ids
        parsed = parse_event_id(priming)
        assert parsed is not None
        assert await _replayed(adapter, format_event_id(parsed.session_id, parsed.token, "f" * 32)) == (None, [])
        await adapter.aclose()
        assert await redis_client.exists(f"{redis_prefix}{{{parsed.session_id}}}:events") == 0


def test_the_manager_takes_no_event_store_of_its_own_and_no_stateless_mode() -> None:
    server = MCPServer("guards")
    with pytest.raises(TypeError):
        scoped_stock_manager(server, InMemoryEventStore(), event_store=SessionScopedEventStore(InMemoryEventStore()))
    with pytest.raises(ValueError, match="stateless"):
        scoped_stock_manager(server, InMemoryEventStore(), stateless=True)
    with pytest.raises(ValueError, match="positive"):
        SessionScopedEventStore(InMemoryEventStore(), max_streams=0)


# -- the stock manager on a real server --------------------------------------------------------------


@dataclass
class _WatchedStore:
    """Our in-memory store, telling the test what it holds: a test waits for a condition on the
    events appended (woken by each append and drop), and may hold replays until one is met."""

    inner: InMemoryEventStore = field(default_factory=InMemoryEventStore)
    appended: list[bytes] = field(default_factory=list)
    hold_replays_until: Callable[[], bool] | None = None
    _waiters: list[tuple[Callable[[], bool], anyio.Event]] = field(default_factory=list)

    def count(self, fragment: bytes) -> int:
        return sum(fragment in data for data in self.appended)

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        if not condition():
            event = anyio.Event()
            self._waiters.append((condition, event))
            await event.wait()

    def _wake(self) -> None:
        for waiter in [waiter for waiter in self._waiters if waiter[0]()]:
            self._waiters.remove(waiter)
            waiter[1].set()

    async def append(self, session_id: str, event: str | None, data: bytes) -> str:
        token = await self.inner.append(session_id, event, data)
        self.appended.append(data)
        self._wake()
        return token

    async def replay(
        self, session_id: str, after: str, until: str | None = None, *, limit: int | None = None
    ) -> Replay | None:
        if self.hold_replays_until is not None:
            await self.wait_until(self.hold_replays_until)
        return await self.inner.replay(session_id, after, until, limit=limit)

    async def trim(self, session_id: str) -> None:
        await self.inner.trim(session_id)

    async def drop(self, session_id: str) -> None:
        await self.inner.drop(session_id)
        self._wake()


def _stock_app(manager: StreamableHTTPSessionManager) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    return Starlette(routes=[Route("/mcp", StreamableHTTPASGIApp(manager))], lifespan=lifespan)


def _gated_server(gates: list[anyio.Event], per_gate: int = 5) -> MCPServer:
    """A tool that sends ``per_gate`` progress notifications, waits for the next gate, and so on,
    then answers "done"."""
    server = MCPServer("stock")

    @server.tool()
    async def countdown(ctx: Context) -> str:
        for index, gate in enumerate(gates):
            for step in range(per_gate):
                await ctx.report_progress(index * per_gate + step)
            await gate.wait()
        return "done"

    return server


_CALL = _message("tools/call", 1, {"name": "countdown", "arguments": {}, "_meta": {"progressToken": 1}})
_PROGRESS = b'"notifications/progress"'


async def test_a_stock_response_stream_cut_mid_call_resumes_with_the_missed_events_once_in_order() -> None:
    """Raw HTTP through a proxy: the call's stream is cut after progress 4; progress 5 to 9 are
    sent and stored while the client is away; a GET with the last ``Last-Event-ID`` it saw gets
    them, once and in order, then (the live stream re-registered: its priming event) the answer."""
    gates = [anyio.Event(), anyio.Event()]
    store = _WatchedStore()
    manager = scoped_stock_manager(_gated_server(gates), store)
    seen: list[int] = []
    resumed_with: list[int] = []
    answer: dict[str, Any] | None = None
    async with serving(_stock_app(manager)) as base:
        session_id = await _open_session(base)
        proxy = CuttingProxy(base)
        async with proxy.running() as proxied:
            last_event_id: str | None = None
            with anyio.fail_after(30):
                while answer is None:
                    headers = _headers(session_id)
                    if last_event_id is not None:
                        headers["last-event-id"] = last_event_id
                        resumed_with.append(len(seen))
                    post = _CALL if last_event_id is None else None
                    async with RawSseStream.open(proxied, "/mcp", headers, post=post) as stream:
                        assert stream.status == 200, stream.body
                        while (event := await stream.next_event()) is not None:
                            last_event_id = event.id or last_event_id
                            if not event.data:  # a priming event: a resumed stream is live from here
                                if post is None:
                                    gates[1].set()
                                continue
                            message = event.json()
                            if "id" in message:
                                answer = message
                                break
                            seen.append(message["params"]["progress"])
                            if seen[-1] == 4 and proxy.cuts == 0:
                                proxy.cut()
                                gates[0].set()
                                await store.wait_until(lambda: store.count(_PROGRESS) == 10)
                                break
    assert seen == list(range(10))
    assert resumed_with[0] == 5
    assert answer is not None and answer["id"] == 1 and answer["result"]["content"][0]["text"] == "done"
    assert last_event_id is not None and parse_event_id(last_event_id) is not None


async def test_the_sdk_client_resumes_a_cut_call_on_the_stock_manager() -> None:
    """``streamable_http_client`` through a proxy cut after progress 4 of a call: the tool sends
    5 to 9 and its answer after the cut (replays wait until the answer is stored, so the resumed
    stream has it all); the client reconnects with ``Last-Event-ID`` and sees each once, in order."""
    gates = [anyio.Event(), anyio.Event()]
    gates[1].set()
    store = _WatchedStore()
    store.hold_replays_until = lambda: store.count(b'"done"') == 1
    manager = scoped_stock_manager(_gated_server(gates), store, retry_interval=10)
    seen: list[float] = []
    async with serving(_stock_app(manager)) as base:
        proxy = CuttingProxy(base)
        async with proxy.running() as proxied:
            with anyio.fail_after(30):
                async with Client(streamable_http_client(f"{proxied}/mcp"), mode="legacy") as client:

                    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                        seen.append(progress)
                        if progress == 4:
                            proxy.cut()
                            gates[0].set()

                    result = await client.call_tool("countdown", {}, progress_callback=on_progress)
    assert result.is_error is False
    assert seen == [float(n) for n in range(10)]
    assert proxy.cuts == 1


async def _call_and_collect(base: str, session_id: str) -> list[SseEvent]:
    """POST the countdown call (its gates open) on the session; every event of its stream."""
    events: list[SseEvent] = []
    async with RawSseStream.open(base, "/mcp", _headers(session_id), post=_CALL) as stream:
        assert stream.status == 200, stream.body
        while (event := await stream.next_event()) is not None:
            events.append(event)
            if event.data and "id" in event.json():
                break
    return events


async def _replay_on(base: str, session_id: str, last_event_id: str) -> list[SseEvent]:
    """A GET with ``Last-Event-ID`` on the session: the messages it replays, up to an answer or
    the end of the stream."""
    events: list[SseEvent] = []
    headers = _headers(session_id, **{"last-event-id": last_event_id})
    async with RawSseStream.open(base, "/mcp", headers) as stream:
        assert stream.status == 200, stream.body
        while (event := await stream.next_event()) is not None:
            if event.data:
                events.append(event)
                if "id" in event.json():
                    break
    return events


def _opened() -> list[anyio.Event]:
    gates = [anyio.Event()]
    gates[0].set()
    return gates


async def test_a_last_event_id_of_one_session_replays_nothing_on_another() -> None:
    """Sessions A and B each call the tool with request id 1 (the same SDK stream id): A's ids
    presented on B get an empty stream; each session's own ids replay its own events."""
    manager = scoped_stock_manager(_gated_server(_opened()), InMemoryEventStore())
    async with serving(_stock_app(manager)) as base:
        with anyio.fail_after(30):
            a, b = await _open_session(base), await _open_session(base)
            a_events, b_events = await _call_and_collect(base, a), await _call_and_collect(base, b)
            for event in [*a_events, *b_events]:
                assert event.id is not None and parse_event_id(event.id) is not None
            a_priming, b_priming = a_events[0], b_events[0]
            assert not a_priming.data and not b_priming.data
            for event in a_events:
                assert event.id is not None
                assert await _replay_on(base, b, event.id) == []
            assert a_priming.id is not None and b_priming.id is not None
            own_a, own_b = await _replay_on(base, a, a_priming.id), await _replay_on(base, b, b_priming.id)
    assert [event.data for event in own_a] == [event.data for event in a_events[1:]]
    assert [event.data for event in own_b] == [event.data for event in b_events[1:]]
    assert {event.id for event in own_a}.isdisjoint(event.id for event in own_b)


class _SharedNaiveStore(SdkEventStore):
    """An event store the way the SDK's example writes one, for the stock manager to share."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, types.JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: str, message: types.JSONRPCMessage | None) -> str:
        event_id = uuid4().hex
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        index = next((i for i, (event_id, _, _) in enumerate(self.events) if event_id == last_event_id), None)
        if index is None:
            return None
        stream_id = self.events[index][1]
        for event_id, stream, message in self.events[index + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


async def test_with_one_naive_store_shared_the_stock_way_a_session_replays_another_sessions_events() -> None:
    """What the adapter prevents, with SDK 2.3.0's stock manager and one store shared by every
    session: session A's ``Last-Event-ID`` presented on session B replays A's call on B."""
    manager = StreamableHTTPSessionManager(lowlevel_of(_gated_server(_opened())), event_store=_SharedNaiveStore())
    async with serving(_stock_app(manager)) as base:
        with anyio.fail_after(30):
            a, b = await _open_session(base), await _open_session(base)
            a_events = await _call_and_collect(base, a)
            assert a_events[0].id is not None
            leaked = await _replay_on(base, b, a_events[0].id)
    assert [event.data for event in leaked] == [event.data for event in a_events[1:]]
    assert json.loads(leaked[-1].data)["result"]["content"][0]["text"] == "done"


async def test_a_deleted_session_drops_its_events_from_the_store() -> None:
    store = _WatchedStore()
    manager = scoped_stock_manager(_gated_server(_opened()), store)
    async with serving(_stock_app(manager)) as base:
        with anyio.fail_after(30):
            session_id = await _open_session(base)
            events = await _call_and_collect(base, session_id)
            assert events[-1].json()["result"]["content"][0]["text"] == "done"
            assert len(store.inner) == 2  # the initialize's stream and the call's
            assert events[0].id is not None
            resume = _headers(session_id, **{"last-event-id": events[0].id})
            async with httpx2.AsyncClient() as client:
                response = await client.delete(f"{base}/mcp", headers=_headers(session_id))
                assert response.status_code == 200
                await store.wait_until(lambda: len(store.inner) == 0)
                assert (await client.get(f"{base}/mcp", headers=resume)).status_code == 404
