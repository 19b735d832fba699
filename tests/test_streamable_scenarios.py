"""Streamable HTTP over real sockets, with the SDK's own client where it can drive the scenario
and raw HTTP where the wire matters: a response stream cut again and again resumes with every
event exactly once and in order; a stalled response stream is cut loose while the rest of its
session goes on; a ``Last-Event-ID`` of another session is refused; 2026-07-28 streams have the
same limits."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from mcp_sse_transport import ErrorCode, SseConfig, streamable_http_app
from mcp_sse_transport.errors import SlowConsumerError

from ._sdk_compat import Client, Context, MCPServer, needs_mcp2, needs_related_progress, streamable_http_client
from ._sdk_compat import httpx as httpx2
from ._streamable import MODERN, Logged, asgi_errors, data, message, open_session
from ._streamable import headers as session_headers
from ._support import CuttingProxy, RawSseStream, SseEvent, serving

pytestmark = pytest.mark.anyio


async def _messages(stream: RawSseStream) -> AsyncIterator[SseEvent]:
    while (event := await stream.next_event()) is not None:
        if event.data:
            yield event


class _Steps:
    """Gates between a tool's bursts of progress notifications, opened by the test."""

    def __init__(self) -> None:
        self.go: list[anyio.Event] = []

    def reset(self, bursts: int) -> None:
        self.go = [anyio.Event() for _ in range(bursts)]


# -- a response stream cut at random points ----------------------------------------------------


def _countdown_server(steps: _Steps, bursts: int, per_burst: int) -> MCPServer:
    """A tool that sends ``bursts`` bursts of ``per_burst`` progress notifications, waiting
    between bursts for the test to open the next gate."""
    server = MCPServer("cuts")

    @server.tool()
    async def countdown(ctx: Context) -> str:
        for burst in range(bursts):
            for step in range(per_burst):
                await ctx.report_progress(burst * per_burst + step, bursts * per_burst)
            await steps.go[burst].wait()
        return "done"

    return server


@needs_related_progress
async def test_a_response_stream_cut_twenty_times_in_a_row_resumes_with_every_event_once_in_order() -> None:
    """Raw HTTP through a proxy that resets the connection at a random point of each burst of
    events (20 bursts of 10, a cut in each): each time the client resumes with GET and the
    ``Last-Event-ID`` it saw last, and gets every one of the 200 events exactly once, in order,
    then the answer, which ends the stream."""
    bursts, per_burst = 20, 10
    steps = _Steps()
    steps.reset(bursts)
    rng = random.Random(20261201)
    cut_at = {burst * per_burst + rng.randrange(per_burst) for burst in range(bursts)}
    seen: list[float] = []
    answer: dict[str, Any] | None = None
    async with serving(streamable_http_app(_countdown_server(steps, bursts, per_burst))) as base:
        session_id = await open_session(base)
        proxy = CuttingProxy(base)
        async with proxy.running() as proxied:
            call = message("tools/call", 1, {"name": "countdown", "arguments": {}, "_meta": {"progressToken": 1}})
            last_event_id: str | None = None
            with anyio.fail_after(60):
                while answer is None:
                    headers = session_headers(session_id)
                    if last_event_id is not None:
                        headers["last-event-id"] = last_event_id
                    async with RawSseStream.open(
                        proxied, "/mcp", headers, post=call if last_event_id is None else None
                    ) as stream:
                        assert stream.status == 200, stream.body
                        while (event := await stream.next_event()) is not None:
                            last_event_id = event.id or last_event_id
                            if not event.data:
                                continue  # the priming event
                            received = event.json()
                            if "id" in received:
                                answer = received
                                break
                            value = received["params"]["progress"]
                            seen.append(value)
                            if int(value) % per_burst == per_burst - 1:
                                steps.go[int(value) // per_burst].set()
                            if int(value) in cut_at:
                                cut_at.discard(int(value))
                                proxy.cut()
                                break
    assert seen == [float(n) for n in range(bursts * per_burst)]
    assert proxy.cuts == bursts
    assert answer is not None and answer["id"] == 1 and answer["result"]["content"][0]["text"] == "done"


@needs_related_progress
async def test_the_sdk_client_resumes_twenty_calls_in_a_row_each_cut_at_a_random_point(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The SDK's ``streamable_http_client`` through a proxy that resets every connection at a
    random point of each call's 10 progress notifications (the tool sends the next only once the
    client saw the last, so what follows a cut is produced while the client is away), 20 calls in
    a row on one session: the client resumes each by ``Last-Event-ID`` and every call sees its
    notifications exactly once, in order, then its result. (One cut per stream: the SDK client
    reconnects a resumed stream that fails again from the id it resumed with, which would repeat
    events; see the README.)"""
    calls, per_call = 20, 10
    rng = random.Random(7)
    acks: list[anyio.Event] = []
    config = SseConfig(retry_interval=0.05)  # the client waits retry: before it reconnects
    server = MCPServer("cuts")

    @server.tool()
    async def burst(ctx: Context) -> str:
        for step in range(per_call):
            await ctx.report_progress(step, per_call)
            await acks[step].wait()
        return "done"

    caplog.set_level(logging.INFO, logger="mcp_sse_transport")
    async with serving(streamable_http_app(server, config=config)) as base:
        proxy = CuttingProxy(base)
        async with proxy.running() as proxied:
            with anyio.fail_after(60):
                async with Client(streamable_http_client(f"{proxied}/mcp"), mode="legacy") as client:
                    for _ in range(calls):
                        seen: list[float] = []
                        acks[:] = [anyio.Event() for _ in range(per_call)]
                        cut = rng.randrange(per_call - 1)

                        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                            seen.append(progress)  # noqa: B023 - the callback runs within its own call
                            if int(progress) == cut:  # noqa: B023
                                proxy.cut()
                            acks[int(progress)].set()

                        result = await client.call_tool("burst", {}, progress_callback=on_progress)
                        assert result.is_error is False
                        assert seen == [float(n) for n in range(per_call)]
    assert proxy.cuts == calls
    resumes = [record for record in caplog.records if record.getMessage().endswith("resuming a stream")]
    assert len(resumes) >= calls


@needs_related_progress
async def test_the_sdk_client_repeats_events_when_its_resumed_stream_is_cut_again() -> None:
    """What the README says of ``streamable_http_client`` (mcp 2.3.0): a resumed stream that is
    cut again is reconnected from the id the client had resumed from, not from the last one it
    received, so the events in between reach the caller twice. The server sent each once after
    the id it was given: the repeat is the client's."""
    per_call = 10
    acks = [anyio.Event() for _ in range(per_call)]
    config = SseConfig(retry_interval=0.05)
    server = MCPServer("recut")

    @server.tool()
    async def burst(ctx: Context) -> str:
        for step in range(per_call):
            await ctx.report_progress(step, per_call)
            await acks[step].wait()
        return "done"

    cuts = {2, 5}
    seen: list[float] = []
    async with serving(streamable_http_app(server, config=config)) as base:
        proxy = CuttingProxy(base)
        async with proxy.running() as proxied:

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                seen.append(progress)
                if int(progress) in cuts:
                    cuts.discard(int(progress))
                    proxy.cut()
                acks[int(progress)].set()

            with anyio.fail_after(30):
                async with Client(streamable_http_client(f"{proxied}/mcp"), mode="legacy") as client:
                    result = await client.call_tool("burst", {}, progress_callback=on_progress)
    assert result.is_error is False
    assert seen == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]


# -- a stalled response stream -----------------------------------------------------------------


@needs_related_progress
async def test_a_stalled_response_stream_is_cut_loose_and_its_session_goes_on() -> None:
    """One POST's response stream stops being read (a small receive buffer) while its tool sends
    1,000 notifications of 1 KiB (far more than the buffer and the sockets hold): the stream is cut
    loose as a slow consumer, the tool's sends are released so it finishes, and meanwhile pings on
    the same session keep being answered, each on its own response stream. The request's caller
    still gets a JSON-RPC error: a resume of the stream ends with it."""
    finished = anyio.Event()
    """The tool's sends were released: it finished (mcp 2.x, whose notify keeps the stream's
    error from the tool) or its send raised the stream's ``SlowConsumerError`` (mcp 1.x)."""
    server = MCPServer("stalls")

    @server.tool()
    async def flood(ctx: Context) -> str:
        try:
            for _ in range(1000):
                await ctx.report_progress(0, None, "x" * 1024)
        except SlowConsumerError:
            finished.set()
            raise
        finished.set()
        return "done"

    cut_loose = Logged("slow consumer cut loose")
    logger = logging.getLogger("mcp_sse_transport")
    logger.addHandler(cut_loose)
    config = SseConfig(grant_timeout=1, write_timeout=2, max_buffered_events=50, socket_send_buffer=4096)
    try:
        async with serving(streamable_http_app(server, config=config)) as base:
            session_id = await open_session(base)
            call = message("tools/call", 1, {"name": "flood", "arguments": {}, "_meta": {"progressToken": 1}})
            async with RawSseStream.open(base, "/mcp", session_headers(session_id), rcvbuf=4096, post=call) as stalled:
                assert stalled.status == 200
                priming = await stalled.next_event()
                assert priming is not None and priming.id is not None
                async with httpx2.AsyncClient(timeout=5) as client:
                    with anyio.fail_after(30):
                        answered = 0
                        while not (finished.is_set() and cut_loose.seen.is_set()) or answered < 20:
                            ping = await client.post(
                                f"{base}/mcp",
                                content=message("ping", 100 + answered),
                                headers=session_headers(session_id),
                            )
                            assert ping.status_code == 200
                            assert data(ping.text) == [{"jsonrpc": "2.0", "id": 100 + answered, "result": {}}]
                            answered += 1
                        headers = session_headers(session_id, **{"last-event-id": priming.id})
                        async with client.stream("GET", f"{base}/mcp", headers=headers) as resumed:
                            assert resumed.status_code == 200, await resumed.aread()
                            text = "".join([chunk async for chunk in resumed.aiter_text()])
    finally:
        logger.removeHandler(cut_loose)
    answer = json.loads(text.rstrip().rsplit("data: ", 1)[1])
    assert answer["id"] == 1 and answer["error"]["code"] == ErrorCode.REQUEST_INTERRUPTED


# -- resumes that are refused ------------------------------------------------------------------


async def _first_event_id(base: str, session_id: str, request_id: int) -> str:
    async with RawSseStream.open(base, "/mcp", session_headers(session_id), post=message("ping", request_id)) as stream:
        event = await stream.next_event()
        assert event is not None and event.id is not None  # the priming event
        await stream.drain()
        return event.id


async def test_a_last_event_id_of_another_session_or_forged_is_refused_with_an_error() -> None:
    server = MCPServer("ids")
    async with serving(streamable_http_app(server)) as base:
        first, second = await open_session(base), await open_session(base)
        event_id = await _first_event_id(base, first, 7)
        stream_id, rest = event_id.split(".", 1)
        secret, token = rest.split(":", 1)
        forged = f"{stream_id}.{'0' * len(secret)}:{token}"
        async with httpx2.AsyncClient(timeout=5) as client:
            with anyio.fail_after(15):
                for session_id, last_event_id in ((second, event_id), (first, forged), (first, "garbage")):
                    headers = session_headers(session_id, **{"last-event-id": last_event_id})
                    refused = await client.get(f"{base}/mcp", headers=headers)
                    assert refused.status_code == 400
                    assert refused.json()["error"]["code"] == ErrorCode.RESUME_UNKNOWN
                # Its own session's id resumes: what followed it is replayed, the answer last.
                async with client.stream(
                    "GET", f"{base}/mcp", headers=session_headers(first, **{"last-event-id": event_id})
                ) as resumed:
                    assert resumed.status_code == 200
                    text = "".join([chunk async for chunk in resumed.aiter_text()])
    assert '"id":7' in text and '"result":{}' in text


# -- 2026-07-28 ----------------------------------------------------------------------------------


def _modern_call(request_id: int, name: str) -> bytes:
    meta = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
        "progressToken": request_id,
    }
    return message("tools/call", request_id, {"name": name, "arguments": {}, "_meta": meta})


@needs_mcp2("protocol 2026-07-28 (the SDK's single-exchange era)")
async def test_a_2026_07_28_response_stream_has_the_same_limits() -> None:
    """A 2026-07-28 POST (the SDK's single-exchange code) whose response stream is not read:
    the tool's notifications wait for room and are released within ``grant_timeout``, the stream
    ending with ``SLOW_CONSUMER``; one that is read gets every notification, then the result."""
    released = anyio.Event()
    server = MCPServer("modern")

    @server.tool()
    async def flood(ctx: Context) -> str:
        try:
            while True:
                await ctx.report_progress(0, None, "x" * 1024)
        except BaseException:
            released.set()
            raise

    @server.tool()
    async def few(ctx: Context) -> str:
        for step in range(5):
            await ctx.report_progress(step, 5)
        return "ok"

    config = SseConfig(grant_timeout=1, write_timeout=2, max_buffered_events=20, socket_send_buffer=4096)
    headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call"}
    async with serving(streamable_http_app(server, config=config)) as base:
        with anyio.fail_after(30), asgi_errors() as escaped:
            async with RawSseStream.open(
                base, "/mcp", {**headers, "mcp-name": "flood"}, rcvbuf=4096, post=_modern_call(1, "flood")
            ) as stalled:
                assert stalled.status == 200
                await released.wait()
                await stalled.drain()
                assert f'"code":{ErrorCode.SLOW_CONSUMER}'.encode() in stalled.body
            async with RawSseStream.open(
                base, "/mcp", {**headers, "mcp-name": "few"}, post=_modern_call(2, "few")
            ) as read:
                events = [event.json() async for event in _messages(read)]
    assert not escaped.seen.is_set(), "the stream's failure escaped the app"
    assert [event.get("method") for event in events[:-1]] == ["notifications/progress"] * 5
    assert events[-1]["id"] == 2 and events[-1]["result"]["content"][0]["text"] == "ok"


@needs_mcp2("subscriptions/listen (protocol 2026-07-28) nor a subscription bus")
async def test_a_subscriptions_listen_stream_gets_idle_heartbeats_and_its_events() -> None:
    """``subscriptions/listen`` (2026-07-28): its long-lived response stream gets this library's
    idle heartbeats, and the events published while it is open."""
    from mcp.server.subscriptions import InMemorySubscriptionBus, ToolsListChanged

    bus = InMemorySubscriptionBus()
    server = MCPServer("listen", subscriptions=bus)
    meta = {"io.modelcontextprotocol/protocolVersion": MODERN, "io.modelcontextprotocol/clientCapabilities": {}}
    listen = message("subscriptions/listen", 1, {"notifications": {"toolsListChanged": True}, "_meta": meta})
    headers = {"mcp-protocol-version": MODERN, "mcp-method": "subscriptions/listen"}
    async with serving(streamable_http_app(server, config=SseConfig(heartbeat_interval=0.2))) as base:
        with anyio.fail_after(15):
            async with RawSseStream.open(base, "/mcp", headers, post=listen) as stream:
                assert stream.status == 200
                ack = await stream.next_event()
                assert ack is not None and ack.json()["method"] == "notifications/subscriptions/acknowledged"
                assert await stream.next_block() == b": ping"
                await bus.publish(ToolsListChanged())
                changed = await stream.next_event()
    assert changed is not None and changed.json()["method"] == "notifications/tools/list_changed"
