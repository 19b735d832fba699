"""The resuming client transport (``mcp_sse_transport.client``) on its own: real uvicorn on
127.0.0.1, the SDK's ``Client``, and servers of the tests' own that misbehave on purpose (a stream
with malformed events; a POST endpoint that drops and refuses one request's POSTs for a while)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_sse_transport import SseConfig, SseServerTransport, sse_app
from mcp_sse_transport._asgi import ABORT_EXTENSION
from mcp_sse_transport.client import resumable_sse_client

from ._sdk_compat import Client, Server, ServerRequestContext, needs_mcp2, types
from ._support import CuttingProxy, serving

pytestmark = pytest.mark.anyio

OPEN = TransportSecuritySettings(enable_dns_rebinding_protection=False)
SESSION = "5e55104d" + "c0ffee00" * 3
"""The fake server's session id (32 hex), which the client must never log in full."""


class _FakeServer:
    """A legacy SSE server of the test's own, one session at a time: it answers ``initialize``
    and ``tools/list`` over its stream, and sends ``before_initialize_result`` (raw SSE blocks)
    just before the ``initialize`` result. Its POST answers 202 once the answer it pushed has been
    handed to the GET's response (a request id it has seen gets 202 alone, as ours does), and it
    records when each POST starts and ends. With ``drop_first_initialize``, the first POST of
    ``initialize`` loses its connection once its result is on the stream: the client cannot tell
    whether it arrived, so it sends it again after the stream's ``retry:`` (``retry_ms``)."""

    def __init__(
        self, before_initialize_result: list[str], *, drop_first_initialize: bool = False, retry_ms: int = 50
    ) -> None:
        self.before = before_initialize_result
        self.drop_first_initialize = drop_first_initialize
        self.retry_ms = retry_ms
        self.posts: list[str] = []
        """``<method> start`` and ``<method> end`` (or ``dropped``) for each POST, in order."""
        self._seen: set[Any] = set()
        self._blocks: MemoryObjectSendStream[tuple[str, anyio.Event]]
        self._incoming: MemoryObjectReceiveStream[tuple[str, anyio.Event]]
        self._blocks, self._incoming = anyio.create_memory_object_stream[tuple[str, anyio.Event]](math.inf)
        self._next_id = 1
        self.app = Starlette(routes=[Route("/sse", self._sse), Route("/messages/", self._post, methods=["POST"])])

    def _push(self, block: str) -> anyio.Event:
        written = anyio.Event()
        self._blocks.send_nowait((block, written))
        return written

    def _message(self, message: dict[str, Any]) -> anyio.Event:
        block = f"event: message\r\ndata: {json.dumps(message)}\r\nid: {SESSION}:{self._next_id}\r\n\r\n"
        self._next_id += 1
        return self._push(block)

    async def _sse(self, request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            yield f"event: endpoint\r\ndata: /messages/?session_id={SESSION}\r\nid: {SESSION}:0\r\n"
            yield f"retry: {self.retry_ms}\r\n\r\n"
            async for block, written in self._incoming:
                yield block
                written.set()

        return StreamingResponse(body(), media_type="text/event-stream")

    async def _post(self, request: Request) -> Response:
        message = await request.json()
        method = message.get("method", "response")
        self.posts.append(f"{method} start")
        if "id" in message and "method" in message and message["id"] not in self._seen:
            self._seen.add(message["id"])
            result: dict[str, Any] = {}
            if method == "initialize":
                for block in self.before:
                    self._push(block)
                result = {
                    "protocolVersion": message["params"]["protocolVersion"],
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "fake", "version": "0"},
                }
            elif method == "tools/list":
                result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
            await self._message({"jsonrpc": "2.0", "id": message["id"], "result": result}).wait()
            if method == "initialize" and self.drop_first_initialize:
                request.scope["extensions"][ABORT_EXTENSION]["abort"]()
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                self.posts.append(f"{method} dropped")
                return Response()  # to a closed connection: uvicorn drops it
        self.posts.append(f"{method} end")
        return Response("Accepted", status_code=202)


MALFORMED = [
    f"event: message\r\ndata: this is not JSON\r\nid: {SESSION}:901\r\n\r\n",
    f'event: message\r\ndata: {{"jsonrpc": "2.0", "id": 7}}\r\nid: {SESSION}:902\r\n\r\n',  # neither result nor error
    f"event: message\r\ndata: [1, 2, 3]\r\nid: {SESSION}:903\r\n\r\n",
    'event: message\r\ndata: {"jsonrpc": "1.0", "method": 5}\r\n\r\n',
    'event: error\r\ndata: {"code": "not a number"}\r\n\r\n',
    "event: error\r\ndata: {{{\r\n\r\n",
]


async def test_malformed_events_are_logged_without_ids_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    fake = _FakeServer(MALFORMED)
    caplog.set_level(logging.WARNING, logger="mcp_sse_transport.client")
    with anyio.fail_after(20):
        async with serving(fake.app) as base:
            async with Client(resumable_sse_client(f"{base}/sse"), mode="legacy") as client:
                # The handshake got through the malformed events before its result; the session goes on.
                tools = await client.list_tools()
                assert [tool.name for tool in tools.tools] == ["echo"]
    skipped = [record for record in caplog.records if "malformed" in record.getMessage()]
    assert len(skipped) == len(MALFORMED), [record.getMessage() for record in caplog.records]
    for record in caplog.records:
        text = record.getMessage()
        assert SESSION not in text, f"a whole session id in the log: {text}"
        assert SESSION[:9] not in text, f"more than 8 characters of a session id: {text}"
        assert ":90" not in text, f"an event id in the log: {text}"
        assert "not JSON" not in text and "{{{" not in text, f"an event's data in the log: {text}"
        assert record.exc_info is None, "one line, no traceback"
    assert all(SESSION[:8] in record.getMessage() for record in skipped)
    assert all(record.levelno == logging.WARNING for record in skipped)


async def test_the_handshake_is_posted_in_order() -> None:
    fake = _FakeServer([], drop_first_initialize=True, retry_ms=500)
    with anyio.fail_after(20):
        async with serving(fake.app) as base:
            # initialize's result arrives, so the SDK sends notifications/initialized, while the
            # initialize POST waits half a second to be sent again: the notification waits too.
            async with Client(resumable_sse_client(f"{base}/sse"), mode="legacy") as client:
                await client.list_tools()
    assert fake.posts[:6] == [
        "initialize start",
        "initialize dropped",
        "initialize start",
        "initialize end",
        "notifications/initialized start",
        "notifications/initialized end",
    ]


@dataclass
class _Gate:
    """What a POST endpoint saw of the ``stuck`` tool's call, and when it lets it through."""

    release: anyio.Event = field(default_factory=anyio.Event)
    """Until set, every POST of ``stuck`` after its first gets 503."""
    stuck_ids: list[types.RequestId] = field(default_factory=list)
    """The request id of each POST of ``stuck``."""
    cancelled: list[types.RequestId] = field(default_factory=list)
    """The request id of each ``notifications/cancelled`` POSTed."""
    seen: list[str] = field(default_factory=list)
    """``stuck <n>`` and ``cancel <id>``, in the order they arrived."""
    cancel_arrived: anyio.Event = field(default_factory=anyio.Event)
    attempt_sender: MemoryObjectSendStream[int] = field(init=False)
    attempts: MemoryObjectReceiveStream[int] = field(init=False)
    """The number of each POST of ``stuck`` as it arrives."""

    def __post_init__(self) -> None:
        self.attempt_sender, self.attempts = anyio.create_memory_object_stream[int](math.inf)


class _HoldStuck:
    """In front of the real server: the first POST of a ``stuck`` call loses its connection (the
    client cannot tell whether it arrived, so it sends it again), and the next ones get 503 until
    the gate is released; then they reach the server. Everything else goes straight through."""

    def __init__(self, app: ASGIApp, gate: _Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        more = True
        while more:
            part = await receive()
            if part["type"] == "http.disconnect":
                return
            chunks.append(part.get("body", b""))
            more = part.get("more_body", False)
        body = b"".join(chunks)
        message = json.loads(body)
        gate = self.gate
        if message.get("method") == "tools/call" and message["params"]["name"] == "stuck":
            gate.stuck_ids.append(message["id"])
            attempt = len(gate.stuck_ids)
            gate.seen.append(f"stuck {attempt}")
            gate.attempt_sender.send_nowait(attempt)
            if attempt == 1:
                scope["extensions"][ABORT_EXTENSION]["abort"]()  # the connection drops, unanswered
                while (await receive())["type"] != "http.disconnect":
                    pass
                return
            if not gate.release.is_set():
                return await Response("Busy", status_code=503, headers={"Retry-After": "1"})(scope, receive, send)
        elif message.get("method") == "notifications/cancelled":
            gate.cancelled.append(message["params"]["requestId"])
            gate.seen.append(f"cancel {message['params']['requestId']}")
            gate.cancel_arrived.set()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@dataclass
class _Tools:
    """The server side: ``stuck`` returns at once, ``hang`` waits until cancelled."""

    stuck_runs: int = 0
    hang_entered: anyio.Event = field(default_factory=anyio.Event)
    hang_cancelled: anyio.Event = field(default_factory=anyio.Event)

    def server(self) -> Server[Any]:
        async def list_tools(
            ctx: ServerRequestContext, params: types.PaginatedRequestParams | None
        ) -> types.ListToolsResult:
            tools = [types.Tool(name=name, input_schema={"type": "object"}) for name in ("stuck", "hang")]
            return types.ListToolsResult(tools=tools)

        async def call_tool(ctx: ServerRequestContext, params: types.CallToolRequestParams) -> types.CallToolResult:
            if params.name == "hang":
                self.hang_entered.set()
                try:
                    await anyio.Event().wait()
                except anyio.get_cancelled_exc_class():
                    self.hang_cancelled.set()
                    raise
            self.stuck_runs += 1
            return types.CallToolResult(content=[types.TextContent(type="text", text="done")])

        return Server("client-tests", on_list_tools=list_tools, on_call_tool=call_tool)


def _app(tools: _Tools, gate: _Gate) -> Starlette:
    app = sse_app(tools.server(), transport_security=OPEN, config=SseConfig(retry_interval=0.05))
    app.add_middleware(_HoldStuck, gate=gate)
    return app


@needs_mcp2("client session that sends notifications/cancelled when a caller gives up on a call")
async def test_a_cancel_goes_out_while_another_requests_post_is_being_retried() -> None:
    tools, gate = _Tools(), _Gate()
    with anyio.fail_after(30):
        async with serving(_app(tools, gate)) as base:
            # Resent every 50 ms for as long as the test needs: its outcome stays unknown.
            transport = resumable_sse_client(f"{base}/sse", max_reconnects=10_000, max_delay=0.05)
            async with Client(transport, mode="legacy") as client, anyio.create_task_group() as tg:
                results: list[str] = []

                async def call_stuck() -> None:
                    result = await client.call_tool("stuck", {})
                    results.extend(c.text for c in result.content if isinstance(c, types.TextContent))

                tg.start_soon(call_stuck)
                assert await gate.attempts.receive() == 1  # dropped: its outcome is unknown
                assert await gate.attempts.receive() == 2  # 503: being sent again

                # Another request gets through meanwhile, and so does its cancel.
                hang_scope = anyio.CancelScope()

                async def call_hang() -> None:
                    with hang_scope:
                        await client.call_tool("hang", {})

                tg.start_soon(call_hang)
                await tools.hang_entered.wait()
                hang_scope.cancel()
                await gate.cancel_arrived.wait()
                await tools.hang_cancelled.wait()
                assert results == [], "the stuck call is still waiting"
                assert gate.cancelled[0] not in gate.stuck_ids, "the cancel is hang's"
                # ... and the stuck request is still being sent again after the cancel arrived.
                cancel_at = gate.seen.index(f"cancel {gate.cancelled[0]}")
                attempts_before_cancel = sum(entry.startswith("stuck") for entry in gate.seen[:cancel_at])
                while await gate.attempts.receive() <= attempts_before_cancel:
                    pass
                assert results == []
                gate.release.set()
            assert results == ["done"]
            assert tools.stuck_runs == 1, "sent many times, run once"
            assert len(set(gate.stuck_ids)) == 1, "always the same request id"


@needs_mcp2("client session that sends notifications/cancelled when a caller gives up on a call")
async def test_a_cancel_stops_its_own_requests_retries_then_goes_out() -> None:
    tools, gate = _Tools(), _Gate()
    with anyio.fail_after(30):
        async with serving(_app(tools, gate)) as base:
            # One POST at a time: the stuck request's retries hold the only slot until they stop.
            transport = resumable_sse_client(
                f"{base}/sse", max_reconnects=10_000, max_delay=0.05, max_concurrent_posts=1
            )
            async with Client(transport, mode="legacy") as client, anyio.create_task_group() as tg:
                stuck_scope = anyio.CancelScope()

                async def call_stuck() -> None:
                    with stuck_scope:
                        await client.call_tool("stuck", {})

                tg.start_soon(call_stuck)
                assert await gate.attempts.receive() == 1
                assert await gate.attempts.receive() == 2
                stuck_scope.cancel()
                await gate.cancel_arrived.wait()
                assert gate.cancelled == [gate.stuck_ids[0]], "the cancel names the stuck request"
                # The slot is free again: its retries stopped before the cancel was sent.
                tools_now = await client.list_tools()
                assert {tool.name for tool in tools_now.tools} == {"stuck", "hang"}
                assert gate.seen[-1] == f"cancel {gate.stuck_ids[0]}", "no POST of stuck after its cancel"
                gate.release.set()
    assert tools.stuck_runs == 0, "it never reached the server"


class _CutBeforeFirstPost:
    """Before the first POST reaches the server: cut the client's stream, and let the POST on only
    once the server has ended the session (a probe: no message went either way), so it gets 404."""

    def __init__(self, app: ASGIApp, proxy: CuttingProxy, transport: SseServerTransport) -> None:
        self.app = app
        self.proxy = proxy
        self.transport = transport
        self.cut = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not self.cut:
            self.cut = True
            session_id = Request(scope).query_params["session_id"]
            session = self.transport._host.sessions.get(session_id)
            assert session is not None
            self.proxy.cut()
            await session.handler.linger()
        await self.app(scope, receive, send)


async def test_a_session_cut_before_its_first_message_is_started_anew_with_nothing_lost() -> None:
    tools = _Tools()
    app = sse_app(tools.server(), transport_security=OPEN, config=SseConfig(retry_interval=0.05))
    transport: SseServerTransport = app.state.sse_transport
    sessions: list[str] = []
    with anyio.fail_after(20):
        async with serving(app) as base:
            proxy = CuttingProxy(base, streams_only=True)
            app.add_middleware(_CutBeforeFirstPost, proxy=proxy, transport=transport)
            async with proxy.running() as proxied:
                client = Client(resumable_sse_client(f"{proxied}/sse", on_session_created=sessions.append))
                async with client:  # its initialize got 404 from the first session: sent to the new one
                    result = await client.call_tool("stuck", {})
                    assert result.content == [types.TextContent(type="text", text="done")]
    assert len(sessions) == 2 and sessions[0] != sessions[1]
    assert proxy.cuts == 1 and tools.stuck_runs == 1


class _UnavailableOnce:
    """The first POST of a ``tools/call`` gets 503 "Session store unavailable", as while Redis
    is out of reach: not delivered. Everything else goes straight through."""

    def __init__(self, app: ASGIApp, calls: list[int]) -> None:
        self.app = app
        self.calls = calls
        """One entry per POST of a ``tools/call``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            message = await receive()
            body = message.get("body", b"")
            if b'"tools/call"' in body:
                self.calls.append(len(self.calls) + 1)
                if len(self.calls) == 1:
                    unavailable = Response("Session store unavailable", status_code=503, headers={"Retry-After": "1"})
                    return await unavailable(scope, receive, send)

            async def replay() -> Message:
                return message

            return await self.app(scope, replay, send)
        await self.app(scope, receive, send)


async def test_a_post_answered_503_is_sent_again_and_runs_once() -> None:
    tools = _Tools()
    app = sse_app(tools.server(), transport_security=OPEN, config=SseConfig(retry_interval=0.05))
    calls: list[int] = []
    app.add_middleware(_UnavailableOnce, calls=calls)
    with anyio.fail_after(20):
        async with serving(app) as base:
            async with Client(resumable_sse_client(f"{base}/sse"), mode="legacy") as client:
                result = await client.call_tool("stuck", {})
                assert result.content == [types.TextContent(type="text", text="done")]
    assert (calls, tools.stuck_runs) == ([1, 2], 1)
