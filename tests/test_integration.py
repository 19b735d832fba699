"""End to end over real sockets: uvicorn on 127.0.0.1, the SDK's own client, raw HTTP on the wire."""

from __future__ import annotations

import contextvars
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.message import SessionMessage
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_sse_transport import ErrorCode, SlowConsumerError, SseConfig, SseServerTransport, _sdk, sse_app
from mcp_sse_transport._sdk import session_message

from ._sdk_compat import MAJOR, Client, Server, ServerRequestContext, example_server, sse_client, types
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, SseEvent, parse_block, serving

pytestmark = pytest.mark.anyio

OPEN = TransportSecuritySettings(enable_dns_rebinding_protection=False)
request_tag: contextvars.ContextVar[str] = contextvars.ContextVar("request_tag", default="unset")


class _Unserializable:
    """A value pydantic cannot turn into JSON."""


async def _list_tools(ctx: ServerRequestContext, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    schema: dict[str, Any] = {"type": "object", "properties": {}}
    return types.ListToolsResult(tools=[types.Tool(name=name, input_schema=schema) for name in ("echo", "whoami")])


async def _call_tool(ctx: ServerRequestContext, params: types.CallToolRequestParams) -> Any:
    if params.name == "whoami":
        assert ctx.request is not None
        text = json.dumps({"header": ctx.request.headers.get("x-tag"), "contextvar": request_tag.get()})
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])
    text = (params.arguments or {}).get("text", "")
    return types.CallToolResult(content=[types.TextContent(type="text", text=str(text))])


def lowlevel_server() -> Server[Any]:
    return Server("integration", on_list_tools=_list_tools, on_call_tool=_call_tool)


class _TagContext:
    """Middleware that sets a context variable per request, as auth and tracing middleware do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tag = dict(scope.get("headers", [])).get(b"x-tag", b"").decode()
        token = request_tag.set(tag or "none")
        try:
            await self.app(scope, receive, send)
        finally:
            request_tag.reset(token)


def text_of(result: types.CallToolResult) -> str:
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return content.text


async def initialize(raw: RawSseStream, http: httpx2.AsyncClient) -> str:
    """Read the endpoint event and complete the handshake by hand; returns the POST URL."""
    endpoint = await raw.next_event()
    assert endpoint is not None and endpoint.event == "endpoint"
    post_url = endpoint.data
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
    }
    assert (await http.post(post_url, json=init)).status_code == 202
    response = await raw.next_event()
    assert response is not None and response.json()["id"] == 0
    await http.post(post_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return post_url


# -- the example server with the SDK client ------------------------------------------------------


async def test_sdk_client_lists_and_calls_the_example_tools() -> None:
    with anyio.fail_after(20):
        async with serving(sse_app(example_server)) as base:
            seen: list[float] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                seen.append(progress)

            async with Client(sse_client(f"{base}/sse"), mode="legacy") as client:
                tools = await client.list_tools()
                assert {tool.name for tool in tools.tools} == {"echo", "countdown", "fail"}
                assert text_of(await client.call_tool("echo", {"text": "héllo\nworld"})) == "héllo\nworld"
                result = await client.call_tool("countdown", {"steps": 5}, progress_callback=on_progress)
                assert text_of(result) == "counted 5 steps"
                assert seen == [1, 2, 3, 4, 5]
                failed = await client.call_tool("fail", {"reason": "boom"})
                assert failed.is_error


async def test_post_request_and_context_variables_reach_the_tool() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    app.add_middleware(_TagContext)
    with anyio.fail_after(20):
        async with serving(app) as base:
            async with Client(sse_client(f"{base}/sse", headers={"x-tag": "alpha"}), mode="legacy") as client:
                seen = json.loads(text_of(await client.call_tool("whoami", {})))
    assert seen == {"header": "alpha", "contextvar": "alpha"}


# -- structured errors ----------------------------------------------------------------------------


class _ServerWithSideChannel:
    """Runs the SDK server on a session and keeps its write stream, so a test can put a message
    on it that the SDK's typed APIs would have refused to build."""

    def __init__(self, transport: SseServerTransport, server: Server[Any]) -> None:
        self.transport = transport
        self.server = server
        self.write_stream: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.transport.connect_sse(scope, receive, send) as (read_stream, write_stream):
            self.write_stream = write_stream
            await self.server.run(read_stream, write_stream, self.server.create_initialization_options())


async def test_unserializable_notification_becomes_an_error_event_and_the_session_goes_on() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    endpoint = _ServerWithSideChannel(app.state.sse_transport, lowlevel_server())
    app.router.routes.append(Route("/side", endpoint=endpoint))
    with anyio.fail_after(20):
        async with serving(app) as base:
            async with RawSseStream.open(base, "/side") as raw, httpx2.AsyncClient(base_url=base) as http:
                post_url = await initialize(raw, http)
                bad = types.JSONRPCNotification(
                    jsonrpc="2.0", method="notifications/message", params={"level": "info", "data": _Unserializable()}
                )
                await endpoint.write_stream.send(session_message(bad))
                error = await raw.next_event()
                assert error is not None and error.event == "error"
                assert error.json() == {
                    "code": ErrorCode.INTERNAL_ERROR,
                    "message": "Outbound message could not be serialized",
                    "data": {"method": "notifications/message"},
                }
                arguments = {"text": "still here"}
                echo = {
                    "jsonrpc": "2.0",
                    "id": 8,
                    "method": "tools/call",
                    "params": {"name": "echo", "arguments": arguments},
                }
                assert (await http.post(post_url, json=echo)).status_code == 202
                after = await raw.next_event()
                assert after is not None and after.json()["result"]["content"][0]["text"] == "still here"


class _AsksUnserializable:
    """An endpoint whose server sends the client a request the transport cannot serialize, then
    waits for the answer, as the SDK's dispatcher would."""

    def __init__(self, transport: SseServerTransport) -> None:
        self.transport = transport
        self.answer: SessionMessage | Exception | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.transport.connect_sse(scope, receive, send) as (read_stream, write_stream):
            request = types.JSONRPCRequest(
                jsonrpc="2.0", id="ask-1", method="roots/list", params={"x": _Unserializable()}
            )
            await write_stream.send(session_message(request))
            self.answer = await read_stream.receive()


async def test_unserializable_server_request_is_answered_so_the_server_caller_does_not_hang() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    endpoint = _AsksUnserializable(app.state.sse_transport)
    app.router.routes.append(Route("/ask", endpoint=endpoint))
    with anyio.fail_after(20):
        async with serving(app) as base, RawSseStream.open(base, "/ask") as raw:
            events = [event async for event in _events(raw)]
    assert [event.event for event in events] == ["endpoint", "error"]
    assert events[1].json()["data"] == {"id": "ask-1", "method": "roots/list"}
    assert isinstance(endpoint.answer, SessionMessage)
    assert _sdk.message_of(endpoint.answer) == types.JSONRPCError(
        jsonrpc="2.0",
        id="ask-1",
        error=types.ErrorData(code=ErrorCode.INTERNAL_ERROR, message="Request could not be serialized"),
    )


class _WritesUnserializableResponse:
    """An endpoint whose server writes a response the transport cannot serialize."""

    def __init__(self, transport: SseServerTransport) -> None:
        self.transport = transport

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.transport.connect_sse(scope, receive, send) as (_, write_stream):
            response = types.JSONRPCResponse(jsonrpc="2.0", id=5, result={"value": _Unserializable()})
            await write_stream.send(session_message(response))
            await write_stream.send(session_message(types.JSONRPCResponse(jsonrpc="2.0", id=6, result={})))


async def test_unserializable_response_is_replaced_by_a_jsonrpc_error_for_its_caller() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    app.router.routes.append(Route("/bad", endpoint=_WritesUnserializableResponse(app.state.sse_transport)))
    with anyio.fail_after(20):
        async with serving(app) as base, RawSseStream.open(base, "/bad") as raw:
            events = [event async for event in _events(raw)]
    assert [event.event for event in events] == ["endpoint", "error", "message", "message"]
    assert events[1].json() == {
        "code": ErrorCode.INTERNAL_ERROR,
        "message": "Outbound message could not be serialized",
        "data": {"id": 5},
    }
    assert events[2].json() == {
        "jsonrpc": "2.0",
        "id": 5,
        "error": {"code": ErrorCode.INTERNAL_ERROR, "message": "Response could not be serialized"},
    }
    assert events[3].json() == {"jsonrpc": "2.0", "id": 6, "result": {}}
    assert raw.ended


async def _events(raw: RawSseStream) -> AsyncIterator[SseEvent]:
    while (event := await raw.next_event()) is not None:
        yield event


@pytest.mark.parametrize(
    ("body", "request_id"),
    [
        pytest.param(b"not json", None, id="not-json"),
        pytest.param(b'{"jsonrpc": "2.0", "id": 41, "method": 5}', 41, id="bad-request-with-id"),
    ],
)
async def test_malformed_post_gets_400_and_an_error_event(body: bytes, request_id: int | None) -> None:
    with anyio.fail_after(20):
        async with serving(sse_app(lowlevel_server(), transport_security=OPEN)) as base:
            async with RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
                post_url = await initialize(raw, http)
                response = await http.post(post_url, content=body, headers={"content-type": "application/json"})
                assert (response.status_code, response.text) == (400, "Could not parse message")
                error = await raw.next_event()
                assert error is not None and error.event == "error"
                assert error.json()["code"] == ErrorCode.PARSE_ERROR
                assert error.json().get("data") == ({"id": request_id} if request_id is not None else None)
                if request_id is not None:
                    answer = await raw.next_event()
                    assert answer is not None
                    assert answer.json()["id"] == request_id
                    assert answer.json()["error"]["code"] == ErrorCode.INVALID_REQUEST
                if MAJOR < 2:  # mcp 1.x's server logs the exception its read stream carried to the client
                    logged = await raw.next_event()
                    assert logged is not None and logged.json()["method"] == "notifications/message"
                ping = {"jsonrpc": "2.0", "id": 99, "method": "ping"}
                assert (await http.post(post_url, json=ping)).status_code == 202
                pong = await raw.next_event()
                assert pong is not None and pong.json() == {"jsonrpc": "2.0", "id": 99, "result": {}}


# -- slow consumers -------------------------------------------------------------------------------


@dataclass
class _Flood:
    """A producer that pushes notifications into a session until the transport refuses one."""

    transport: SseServerTransport
    sent: int = 0
    max_buffered_bytes_seen: int = 0
    outcome: BaseException | None = None
    started: anyio.Event = field(default_factory=anyio.Event)
    released: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with self.transport.connect_sse(scope, receive, send) as (_, write_stream):
            self.started.set()
            payload = "x" * 1000
            try:
                while True:
                    note = types.JSONRPCNotification(
                        jsonrpc="2.0", method="notifications/message", params={"data": payload}
                    )
                    await write_stream.send(session_message(note))
                    self.sent += 1
                    stats = self.transport.statistics()
                    self.max_buffered_bytes_seen = max(self.max_buffered_bytes_seen, stats.buffered_bytes)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:  # cut loose, or shut down
                self.outcome = exc
            finally:
                self.released.set()


async def test_a_client_that_stops_reading_is_cut_loose_without_affecting_others() -> None:
    config = SseConfig(max_buffered_events=64, max_buffered_bytes=32 * 1024, grant_timeout=0.5, write_timeout=0.5)
    app = sse_app(lowlevel_server(), transport_security=OPEN, config=config)
    transport: SseServerTransport = app.state.sse_transport
    flood = _Flood(transport)
    app.router.routes.append(Route("/flood", endpoint=flood, methods=["GET"]))
    assert isinstance(app, Starlette)

    with anyio.fail_after(30):
        async with serving(app) as base:
            async with Client(sse_client(f"{base}/sse"), mode="legacy") as other:
                # The stalled client: a tiny receive window, and it never reads past the head.
                async with RawSseStream.open(base, "/flood", rcvbuf=4096) as stalled:
                    await flood.started.wait()
                    round_trips = 0
                    while not flood.released.is_set():
                        assert text_of(await other.call_tool("echo", {"text": str(round_trips)})) == str(round_trips)
                        round_trips += 1
                    assert isinstance(flood.outcome, SlowConsumerError)
                    assert flood.max_buffered_bytes_seen <= config.max_buffered_bytes
                    # The server dropped the connection: reading to the end terminates, with no
                    # terminating chunk (the stream was cut, not completed).
                    await stalled.drain()
                    assert stalled.closed and not stalled.ended
                # Memory and tasks released: only the healthy session remains registered.
                assert transport.statistics().open_sessions == 1
                assert text_of(await other.call_tool("echo", {"text": "after"})) == "after"
    assert round_trips > 0


# -- heartbeats -----------------------------------------------------------------------------------


async def test_heartbeats_are_written_only_while_the_stream_is_idle() -> None:
    config = SseConfig(heartbeat_interval=1.0)
    with anyio.fail_after(30):
        async with serving(sse_app(lowlevel_server(), transport_security=OPEN, config=config)) as base:
            async with RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
                post_url = await initialize(raw, http)
                # Idle: the next block is a heartbeat comment.
                assert await raw.next_block() == b": ping"
                # Busy: a request answered every few milliseconds, well inside the interval.
                blocks: list[bytes] = []
                for n in range(1, 61):  # ids after the initialize's 0: a session never reuses one
                    assert (
                        await http.post(post_url, json={"jsonrpc": "2.0", "id": n, "method": "ping"})
                    ).status_code == 202
                    block = await raw.next_block()
                    assert block is not None
                    blocks.append(block)
                assert not [block for block in blocks if block.startswith(b":")]
                events = [parse_block(block) for block in blocks]
                assert [event.json()["id"] if event else None for event in events] == list(range(1, 61))
                # Idle again: heartbeats resume.
                assert await raw.next_block() == b": ping"


# -- shutdown -------------------------------------------------------------------------------------


async def test_lifespan_shutdown_ends_streams_with_the_shutdown_event_and_terminating_chunk() -> None:
    config = SseConfig(retry_interval=2.5)
    with anyio.fail_after(30):
        app = sse_app(lowlevel_server(), transport_security=OPEN, config=config)
        async with serving(app) as base, RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
            await initialize(raw, http)
            await app.state.sse_transport.shutdown()
            final = await raw.next_event()
            assert final == SseEvent(
                event="error",
                data=json.dumps(
                    {"code": ErrorCode.SERVER_SHUTDOWN, "message": "Server shutting down"}, separators=(",", ":")
                ),
                retry=2500,
            )
            assert await raw.next_event() is None
            assert raw.ended
            refused = await http.get("/sse")
            assert refused.status_code == 503


# -- limits ---------------------------------------------------------------------------------------


async def test_sessions_past_the_cap_get_503_and_open_ones_are_untouched() -> None:
    config = SseConfig(max_sessions=2, retry_interval=2)
    with anyio.fail_after(20):
        async with serving(sse_app(lowlevel_server(), transport_security=OPEN, config=config)) as base:
            async with (
                RawSseStream.open(base) as first,
                RawSseStream.open(base) as second,
                httpx2.AsyncClient(base_url=base) as http,
            ):
                first_post = await initialize(first, http)
                await initialize(second, http)
                refused = await http.get("/sse")
                assert (refused.status_code, refused.text) == (503, "Too many open sessions")
                assert refused.headers["retry-after"] == "2"
                assert (
                    await http.post(first_post, json={"jsonrpc": "2.0", "id": 5, "method": "ping"})
                ).status_code == 202
                pong = await first.next_event()
                assert pong is not None and pong.json() == {"jsonrpc": "2.0", "id": 5, "result": {}}
