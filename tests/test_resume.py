"""Resumption by Last-Event-ID over real sockets, with connections cut by a proxy mid-stream."""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_sse_transport import ErrorCode, SseConfig, sse_app
from mcp_sse_transport.client import resumable_sse_client

from ._cluster import one_request_per_connection
from ._sdk_compat import Client, MCPError, Server, ServerRequestContext, types
from ._sdk_compat import httpx as httpx2
from ._support import CuttingProxy, RawSseStream, SseEvent, serving

pytestmark = pytest.mark.anyio

OPEN = TransportSecuritySettings(enable_dns_rebinding_protection=False)


async def _list_tools(ctx: ServerRequestContext, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(
        tools=[types.Tool(name=name, input_schema={"type": "object"}) for name in ("stream", "hang")]
    )


stream_runs: list[int] = []
"""One entry per run of the ``stream`` tool, its count."""

hang_entered: list[anyio.Event] = []
"""Set when the ``hang`` tool starts: the server holds the call."""


async def _call_tool(ctx: ServerRequestContext, params: types.CallToolRequestParams) -> types.CallToolResult:
    if params.name == "hang":
        for event in hang_entered:
            event.set()
        await anyio.Event().wait()
    count = int((params.arguments or {})["count"])
    stream_runs.append(count)
    token = ctx.meta.get("progress_token") if ctx.meta else None
    for n in range(1, count + 1):
        if token is not None:
            await ctx.session.send_progress_notification(token, n, count, related_request_id=str(ctx.request_id))
    return types.CallToolResult(content=[types.TextContent(type="text", text=f"streamed {count}")])


def streaming_server() -> Server[Any]:
    return Server("resume", on_list_tools=_list_tools, on_call_tool=_call_tool)


class _UserFromHeader:
    """Authenticates each request as the user its ``x-user`` header names, as auth middleware
    would from a bearer token."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user = dict(scope.get("headers", [])).get(b"x-user")
        if user is not None:
            token = AccessToken(token=user.decode(), client_id=user.decode(), scopes=[])
            scope["user"] = AuthenticatedUser(token)
        await self.app(scope, receive, send)


async def start_session(raw: RawSseStream, http: httpx2.AsyncClient, retry_ms: int = 3000) -> str:
    """Read the endpoint event and complete the handshake; returns the POST URL."""
    return (await open_session(raw, http, retry_ms))[0]


async def open_session(raw: RawSseStream, http: httpx2.AsyncClient, retry_ms: int = 3000) -> tuple[str, str]:
    """Read the endpoint event and complete the handshake; returns the POST URL and the endpoint
    event's id, which resumes the session from before its first event."""
    endpoint = await raw.next_event()
    assert endpoint is not None and endpoint.event == "endpoint" and endpoint.id is not None
    assert endpoint.retry == retry_ms
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
    }
    assert (await http.post(endpoint.data, json=init)).status_code == 202
    answer = await raw.next_event()
    assert answer is not None and answer.json()["id"] == 0 and answer.id is not None
    await http.post(endpoint.data, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return endpoint.data, endpoint.id


def call_stream(count: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "stream", "arguments": {"count": count}, "_meta": {"progressToken": "p"}},
    }


async def test_every_event_arrives_exactly_once_in_order_across_20_random_cuts() -> None:
    count = 5000
    rng = random.Random(20261128)
    cut_points = sorted(rng.sample(range(1, count), 20))
    # Retention well above what can be in flight, so this test is about exactly-once delivery.
    config = SseConfig(replay_max_events=count * 2, replay_max_bytes=64 * 1024 * 1024)
    progress: list[float] = []
    ids: list[str] = []
    result: dict[str, Any] | None = None
    connections = 0
    with anyio.fail_after(120):
        async with serving(sse_app(streaming_server(), transport_security=OPEN, config=config)) as base:
            proxy = CuttingProxy(base)
            async with proxy.running() as proxied, httpx2.AsyncClient(base_url=base) as http:
                post_url: str | None = None
                while result is None:
                    headers = {"Last-Event-ID": ids[-1]} if ids else {}
                    async with RawSseStream.open(proxied, headers=headers) as raw:
                        connections += 1
                        if post_url is None:
                            post_url = await start_session(raw, http)
                            assert (await http.post(post_url, json=call_stream(count))).status_code == 202
                        else:
                            endpoint = await raw.next_event()
                            assert endpoint is not None and endpoint.event == "endpoint"
                            assert endpoint.data == post_url, "a resume continues the same session"
                        while (event := await raw.next_event()) is not None:
                            assert event.event == "message" and event.id is not None
                            ids.append(event.id)
                            message = event.json()
                            if message.get("method") == "notifications/progress":
                                progress.append(message["params"]["progress"])
                                if cut_points and len(progress) >= cut_points[0]:
                                    # The drop: whatever this connection still holds is lost.
                                    cut_points.pop(0)
                                    proxy.cut()
                                    break
                            else:
                                result = message
                                break
    assert progress == list(range(1, count + 1)), "every event exactly once, in order"
    assert len(set(ids)) == len(ids)
    assert result is not None and result["id"] == 1
    assert result["result"]["content"][0]["text"] == f"streamed {count}"
    assert proxy.cuts == 20 and connections == 21


async def test_a_resume_supersedes_a_connection_that_is_still_open() -> None:
    with anyio.fail_after(20):
        async with serving(sse_app(streaming_server(), transport_security=OPEN)) as base:
            async with RawSseStream.open(base) as first, httpx2.AsyncClient(base_url=base) as http:
                post_url = await start_session(first, http)
                assert (await http.post(post_url, json=call_stream(3))).status_code == 202
                seen = [await first.next_event() for _ in range(2)]
                last_id = seen[-1].id if seen[-1] is not None else None
                assert last_id is not None
                async with RawSseStream.open(base, headers={"Last-Event-ID": last_id}) as second:
                    endpoint = await second.next_event()
                    assert endpoint is not None and endpoint.data == post_url
                    rest = [await second.next_event() for _ in range(2)]
                    assert [e.json().get("params", {}).get("progress") for e in rest if e] == [3, None]
                    # What the first connection had already been sent, it still reads; then the end.
                    superseded = await first.next_event()
                    while superseded is not None and superseded.event == "message":
                        superseded = await first.next_event()
                    assert superseded is not None and superseded.event == "error"
                    assert superseded.json()["code"] == ErrorCode.SUPERSEDED
                    assert await first.next_event() is None and first.ended


async def _resume_answer(base: str, last_event_id: str, headers: dict[str, str] | None = None) -> list[SseEvent]:
    """The first events a GET with this Last-Event-ID gets, up to and including the endpoint."""
    events: list[SseEvent] = []
    async with RawSseStream.open(base, headers={"Last-Event-ID": last_event_id, **(headers or {})}) as raw:
        while (event := await raw.next_event()) is not None:
            events.append(event)
            if event.event == "endpoint":
                break
    return events


async def test_odd_last_event_ids_get_the_unknown_answer_and_never_another_sessions_events() -> None:
    app = sse_app(streaming_server(), transport_security=OPEN)
    app.add_middleware(_UserFromHeader)
    with anyio.fail_after(30):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base, headers={"x-user": "alice"}) as http:
            async with RawSseStream.open(base, headers={"x-user": "alice"}) as alice:
                alice_post = await start_session(alice, http)
                assert (await http.post(alice_post, json=call_stream(2))).status_code == 202
                events = [await alice.next_event() for _ in range(3)]
                alice_id = events[0].id if events[0] is not None else None
                assert alice_id is not None
                session_part, secret = alice_id.split(":")[0].split(".")
                assert alice_post.endswith(f"session_id={session_part}") and secret not in alice_post
                odd = {
                    "malformed": "not-an-event-id",
                    "huge": "f" * 32 + ":" + "9" * 4000,
                    "forged-token": f"{session_part}.{secret}:999999",
                    "unknown-session": "0" * 32 + "." + secret + ":1",
                    "another-credential": alice_id,
                    "from-the-post-url": f"{session_part}:0",
                    "another-secret": f"{session_part}.{'0' * 32}:0",
                    "secret-uppercase": f"{session_part}.{secret.upper()}:0",
                }
                for name, value in odd.items():
                    answer = await _resume_answer(base, value, {"x-user": "mallory"})
                    assert [event.event for event in answer] == ["error", "endpoint"], name
                    assert answer[0].json()["code"] == ErrorCode.RESUME_UNKNOWN, name
                    assert session_part not in answer[1].data, f"{name}: a new session, never alice's"
                # The owner still resumes, and nothing of alice's went anywhere else.
                resumed = await _resume_answer(base, alice_id, {"x-user": "alice"})
                assert [event.event for event in resumed] == ["endpoint"]
                assert session_part in resumed[0].data
            empty = await _resume_answer(base, "")
            assert [event.event for event in empty] == ["endpoint"], "an empty id is no resume at all"


async def test_resuming_past_the_retained_log_reports_the_gap_then_replays_what_is_left() -> None:
    config = SseConfig(replay_max_events=5, max_buffered_events=5)
    with anyio.fail_after(20):
        async with serving(sse_app(streaming_server(), transport_security=OPEN, config=config)) as base:
            async with httpx2.AsyncClient(base_url=base) as http:
                async with RawSseStream.open(base) as raw:
                    post_url = await start_session(raw, http)
                    first_id = await _first_id_after_posting(raw, http, post_url)
                    events = [await raw.next_event() for _ in range(20)]
                    assert all(event is not None for event in events)
                answer: list[SseEvent] = []
                async with RawSseStream.open(base, headers={"Last-Event-ID": first_id}) as again:
                    for _ in range(7):
                        event = await again.next_event()
                        assert event is not None
                        answer.append(event)
    assert [event.event for event in answer] == [
        "endpoint",
        "error",
        "message",
        "message",
        "message",
        "message",
        "message",
    ]
    assert answer[1].json()["code"] == ErrorCode.RESUME_GAP
    progress = [event.json().get("params", {}).get("progress") for event in answer[2:]]
    assert progress == [17, 18, 19, 20, None], "the five retained events, oldest first"


async def _first_id_after_posting(raw: RawSseStream, http: httpx2.AsyncClient, post_url: str) -> str:
    assert (await http.post(post_url, json=call_stream(20))).status_code == 202
    first = await raw.next_event()
    assert first is not None and first.id is not None
    return first.id


async def test_the_resuming_client_transport_carries_one_call_through_several_drops() -> None:
    count = 5000
    cut_points = [500, 1500, 2600, 3100, 4700]
    config = SseConfig(retry_interval=0.05, replay_max_events=count * 2, replay_max_bytes=64 * 1024 * 1024)
    received: list[float] = []
    with anyio.fail_after(120):
        async with serving(sse_app(streaming_server(), transport_security=OPEN, config=config)) as base:
            proxy = CuttingProxy(base)
            async with proxy.running() as proxied:

                async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                    received.append(progress)
                    if cut_points and len(received) == cut_points[0]:
                        cut_points.pop(0)
                        proxy.cut()

                async with Client(resumable_sse_client(f"{proxied}/sse"), mode="legacy") as client:
                    result = await client.call_tool("stream", {"count": count}, progress_callback=on_progress)
                    assert result.content[0] == types.TextContent(type="text", text=f"streamed {count}")
                    # The same session goes on after the drops.
                    again = await client.call_tool("stream", {"count": 1})
                    assert again.content[0] == types.TextContent(type="text", text="streamed 1")
    assert received == list(range(1, count + 1))
    assert proxy.cuts == 5


async def test_a_lost_session_fails_the_waiting_call_with_a_typed_error() -> None:
    config = SseConfig(retry_interval=0.3, session_grace=0.05)
    with anyio.fail_after(30):
        async with serving(sse_app(streaming_server(), transport_security=OPEN, config=config)) as base:
            proxy = CuttingProxy(base)
            async with proxy.running() as proxied:
                async with Client(resumable_sse_client(f"{proxied}/sse"), mode="legacy") as client:
                    async with anyio.create_task_group() as tg:
                        failure: list[MCPError] = []

                        async def call() -> None:
                            with pytest.raises(MCPError) as caught:
                                await client.call_tool("hang", {})
                            failure.append(caught.value)

                        entered = anyio.Event()
                        hang_entered.append(entered)
                        tg.start_soon(call)
                        await entered.wait()
                        hang_entered.remove(entered)
                        # The client comes back after retry (0.3 s), past the grace period (0.05 s).
                        proxy.cut()
    assert failure and failure[0].error.code == ErrorCode.RESUME_UNKNOWN


async def test_a_post_whose_answer_is_lost_is_sent_again_and_runs_once() -> None:
    config = SseConfig(retry_interval=0.05)
    with anyio.fail_after(30):
        async with serving(sse_app(streaming_server(), transport_security=OPEN, config=config)) as base:
            proxy = CuttingProxy(base)
            async with proxy.running() as proxied:
                transport = resumable_sse_client(f"{proxied}/sse", httpx_client_factory=one_request_per_connection)
                async with Client(transport, mode="legacy") as client:
                    runs = len(stream_runs)
                    proxy.lose_post_responses = 2  # the first POST, and the one sent again after it
                    result = await client.call_tool("stream", {"count": 3})
                    assert result.content[0] == types.TextContent(type="text", text="streamed 3")
                    assert stream_runs[runs:] == [3], "sent three times, run once"
                    assert proxy.lose_post_responses == 0
