"""Faults over real sockets: oversized results, churn, producer failures, reconnect storms,
shutdown under load. Nothing lost where the promise says so, nothing leaked."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from mcp_sse_transport import ErrorCode, SseConfig, sse_app
from mcp_sse_transport.client import resumable_sse_client

from ._sdk_compat import Client, MCPError, Server, ServerRequestContext, types
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, serving
from .test_integration import OPEN, initialize
from .test_resume import call_stream

pytestmark = pytest.mark.anyio

BIG = 8 * 1024 * 1024


async def _list_tools(ctx: ServerRequestContext, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    names = ("big", "fail_midway", "stream")
    return types.ListToolsResult(tools=[types.Tool(name=name, input_schema={"type": "object"}) for name in names])


async def _call_tool(ctx: ServerRequestContext, params: types.CallToolRequestParams) -> types.CallToolResult:
    arguments = params.arguments or {}
    token = ctx.meta.get("progress_token") if ctx.meta else None
    if params.name == "big":
        return types.CallToolResult(content=[types.TextContent(type="text", text="x" * BIG)])
    count = int(arguments.get("count", 10))
    for n in range(1, count + 1):
        if token is not None:
            await ctx.session.send_progress_notification(token, n, count, related_request_id=str(ctx.request_id))
        if params.name == "fail_midway" and n == count // 2:
            raise RuntimeError("the producer failed mid-stream")
    return types.CallToolResult(content=[types.TextContent(type="text", text=f"streamed {count}")])


def fault_server() -> Server[Any]:
    return Server("faults", on_list_tools=_list_tools, on_call_tool=_call_tool)


async def test_a_result_far_larger_than_the_buffer_is_delivered_whole() -> None:
    config = SseConfig(
        max_buffered_bytes=256 * 1024, max_buffered_events=8, max_event_bytes=2 * BIG, replay_max_bytes=2 * BIG
    )
    with anyio.fail_after(60):
        async with serving(sse_app(fault_server(), transport_security=OPEN, config=config)) as base:
            async with Client(resumable_sse_client(f"{base}/sse"), mode="legacy") as client:
                result = await client.call_tool("big", {})
                content = result.content[0]
                assert isinstance(content, types.TextContent) and len(content.text) == BIG
                assert (await client.call_tool("stream", {"count": 3})).content[0] == types.TextContent(
                    type="text", text="streamed 3"
                )


async def test_a_result_over_the_event_limit_is_refused_with_an_error_and_the_session_goes_on() -> None:
    config = SseConfig(max_event_bytes=BIG // 2, replay_max_bytes=BIG)
    with anyio.fail_after(60):
        async with serving(sse_app(fault_server(), transport_security=OPEN, config=config)) as base:
            async with RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
                post_url = await initialize(raw, http)
                call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "big", "arguments": {}}}
                assert (await http.post(post_url, json=call)).status_code == 202
                error, answer = await raw.next_event(), await raw.next_event()
                assert error is not None and error.event == "error"
                assert error.json() == {
                    "code": ErrorCode.MESSAGE_TOO_LARGE,
                    "message": "Outbound message is too large",
                    "data": {"id": 7, "size": error.json()["data"]["size"], "max_event_bytes": BIG // 2},
                }
                assert error.json()["data"]["size"] > BIG
                assert answer is not None and answer.json() == {
                    "jsonrpc": "2.0",
                    "id": 7,
                    "error": {"code": ErrorCode.MESSAGE_TOO_LARGE, "message": "Response is too large"},
                }
                # Nothing was granted for it: the session goes on, and a resume replays no gap.
                call["id"], call["params"] = 8, {"name": "stream", "arguments": {"count": 1}}
                assert (await http.post(post_url, json=call)).status_code == 202
                streamed = await raw.next_event()
                assert streamed is not None and streamed.json()["id"] == 8
                assert streamed.json()["result"]["content"] == [{"type": "text", "text": "streamed 1"}]


async def test_a_producer_failing_mid_stream_errors_its_call_and_the_session_goes_on() -> None:
    with anyio.fail_after(30):
        async with serving(sse_app(fault_server(), transport_security=OPEN)) as base:
            received: list[float] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                received.append(progress)

            async with Client(resumable_sse_client(f"{base}/sse"), mode="legacy") as client:
                with pytest.raises(MCPError, match="failed mid-stream"):
                    await client.call_tool("fail_midway", {"count": 10}, progress_callback=on_progress)
                assert received == [1, 2, 3, 4, 5]
                ok = await client.call_tool("stream", {"count": 2})
                assert ok.content[0] == types.TextContent(type="text", text="streamed 2")


async def test_a_thousand_sessions_opening_and_closing_at_once_leave_nothing_behind() -> None:
    config = SseConfig(session_grace=0)
    app = sse_app(fault_server(), transport_security=OPEN, config=config)
    transport = app.state.sse_transport
    opened = 0
    with anyio.fail_after(120):
        async with serving(app) as base:
            sessions: list[Any] = []

            async def one_session(limiter: anyio.CapacityLimiter) -> None:
                nonlocal opened
                async with limiter, RawSseStream.open(base) as raw:
                    endpoint = await raw.next_event()
                    assert endpoint is not None and endpoint.event == "endpoint"
                    session_id = endpoint.data.split("session_id=")[1]
                    sessions.append(transport._host.sessions.get(session_id).handler)
                    opened += 1

            limiter = anyio.CapacityLimiter(250)
            async with anyio.create_task_group() as tg:
                for _ in range(1000):
                    tg.start_soon(one_session, limiter)
            for handler in sessions:  # each returns once its session has ended
                await handler.linger()
            assert transport.statistics().open_sessions == 0, "every session ended with its connection"
            assert len(transport._backplane.store) == 0, "no replay log left behind"
    assert opened == 1000


async def test_a_client_reconnecting_in_a_tight_loop_keeps_one_session_and_loses_nothing() -> None:
    with anyio.fail_after(60):
        async with serving(sse_app(fault_server(), transport_security=OPEN)) as base:
            async with RawSseStream.open(base) as first, httpx2.AsyncClient(base_url=base) as http:
                post_url = await initialize(first, http)
                assert (await http.post(post_url, json=call_stream(400))).status_code == 202
                first_event = await first.next_event()
                assert first_event is not None and first_event.id is not None
                last_id, seen = first_event.id, [first_event.json()["params"]["progress"]]
            result = None
            reconnects = 0
            while result is None:
                async with RawSseStream.open(base, headers={"Last-Event-ID": last_id}) as again:
                    reconnects += 1
                    endpoint = await again.next_event()
                    assert endpoint is not None and endpoint.data == post_url
                    event = await again.next_event()  # one event per connection, then drop it
                    assert event is not None and event.id is not None
                    last_id = event.id
                    message = event.json()
                    if message.get("method") == "notifications/progress":
                        seen.append(message["params"]["progress"])
                    else:
                        result = message
    assert seen == list(range(1, 401))
    assert result["result"]["content"][0]["text"] == "streamed 400"
    assert reconnects == 400  # one event per connection after the first


async def test_shutdown_under_traffic_ends_every_stream_with_the_shutdown_event() -> None:
    config = SseConfig(drain_timeout=5)
    app = sse_app(fault_server(), transport_security=OPEN, config=config)
    endings: list[tuple[bool, int | None]] = []
    with anyio.fail_after(60):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            started = anyio.Event()
            ready = 0

            async def busy_session() -> None:
                nonlocal ready
                async with RawSseStream.open(base) as raw:
                    post_url = await initialize(raw, http)
                    assert (await http.post(post_url, json=call_stream(30_000))).status_code == 202
                    ready += 1
                    if ready == 20:
                        started.set()
                    code = None
                    while (event := await raw.next_event()) is not None:
                        if event.event == "error":
                            code = event.json()["code"]
                    endings.append((raw.ended, code))

            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(busy_session)
                await started.wait()
                await app.state.sse_transport.shutdown()
    assert len(endings) == 20
    assert all(ended and code == ErrorCode.SERVER_SHUTDOWN for ended, code in endings), endings


async def test_a_lost_session_is_reported_to_the_resuming_client_not_hidden() -> None:
    """After the server forgets a session, the resuming client's next call fails with a typed error."""
    config = SseConfig(session_grace=0.01, retry_interval=0.05)
    with anyio.fail_after(30):
        app = sse_app(fault_server(), transport_security=OPEN, config=config)
        async with serving(app) as base:
            async with Client(resumable_sse_client(f"{base}/sse"), mode="legacy") as client:
                await client.call_tool("stream", {"count": 1})
                await app.state.sse_transport.shutdown()  # the server forgets every session
                with pytest.raises(MCPError):
                    await client.call_tool("stream", {"count": 1})
