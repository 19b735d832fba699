"""One process, tried as an attacker and a careless client would: a session that ends stops its
server's work, the POST URL cannot read the stream, any Starlette authentication binds a session,
and request ids are bounded in bytes. Real uvicorn, raw sockets, the SDK's lowlevel server."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection

from mcp_sse_transport import ErrorCode, SseConfig, SseServerTransport, sse_app
from mcp_sse_transport.errors import SessionExpiredError, SlowConsumerError

from ._sdk_compat import Server, ServerRequestContext, types
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, SseEvent, serving
from .test_integration import OPEN, initialize

pytestmark = pytest.mark.anyio


@dataclass
class _Flood:
    """A tool that streams progress until it is cancelled: it never ends by itself."""

    started: anyio.Event = field(default_factory=anyio.Event)
    stopped: anyio.Event = field(default_factory=anyio.Event)
    cancelled: bool = False
    failed: BaseException | None = None
    """What the tool's send raised instead: mcp 1.x hands a send's error to the tool (the
    session's ``SlowConsumerError``, ``SessionExpiredError``), 2.x's notify keeps it."""
    sent: int = 0

    @property
    def ended_by_its_session(self) -> bool:
        """Cancelled, or (mcp 1.x) stopped by the error of the session that ended."""
        return self.cancelled or isinstance(self.failed, SlowConsumerError | SessionExpiredError)

    async def call_tool(self, ctx: ServerRequestContext, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name == "echo":
            return types.CallToolResult(content=[types.TextContent(type="text", text=str(params.arguments))])
        token = ctx.meta.get("progress_token") if ctx.meta else None
        assert token is not None
        self.started.set()
        try:
            while True:
                await ctx.session.send_progress_notification(token, self.sent, related_request_id=str(ctx.request_id))
                self.sent += 1
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise
        except Exception as exc:
            self.failed = exc
            raise
        finally:
            self.stopped.set()


async def _list_tools(ctx: ServerRequestContext, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(
        tools=[types.Tool(name=name, input_schema={"type": "object"}) for name in ("flood", "echo")]
    )


def _server(flood: _Flood) -> Server[Any]:
    return Server("hardening", on_list_tools=_list_tools, on_call_tool=flood.call_tool)


FLOOD_CALL = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "tools/call",
    "params": {"name": "flood", "arguments": {}, "_meta": {"progressToken": "p"}},
}


# -- a session that ends for good stops its server's work --------------------------------------


async def _call_flood(raw: RawSseStream, http: httpx2.AsyncClient, flood: _Flood) -> None:
    """Open the session on ``raw`` and start the flood tool in it."""
    post_url = await initialize(raw, http)
    assert (await http.post(post_url, json=FLOOD_CALL)).status_code == 202
    await flood.started.wait()


async def test_a_tool_streaming_into_a_dropped_session_is_cancelled_within_a_second() -> None:
    flood = _Flood()
    app = sse_app(_server(flood), transport_security=OPEN, config=SseConfig(session_grace=0))
    transport: SseServerTransport = app.state.sse_transport
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            async with RawSseStream.open(base) as raw:
                await _call_flood(raw, http, flood)
                for _ in range(3):
                    event = await raw.next_event()
                    assert event is not None and event.json()["method"] == "notifications/progress"
            # The connection is gone and session_grace is 0: the session ended for good.
            with anyio.fail_after(1):
                await flood.stopped.wait()
            assert flood.cancelled, "the tool was cancelled, not left to finish"
            assert transport.statistics().open_sessions == 0


async def test_a_tool_streaming_to_a_client_that_stopped_reading_is_cancelled_when_it_is_cut_loose() -> None:
    flood = _Flood()
    config = SseConfig(max_buffered_events=16, max_buffered_bytes=16 * 1024, grant_timeout=0.5, write_timeout=0.5)
    app = sse_app(_server(flood), transport_security=OPEN, config=config)
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            async with RawSseStream.open(base, rcvbuf=4096) as stalled:
                await _call_flood(stalled, http, flood)
                # It reads nothing more: the session is cut loose as a slow consumer, which ends
                # it for good whatever session_grace says, and the tool with it.
                await flood.stopped.wait()
                assert flood.ended_by_its_session


async def test_a_tool_streaming_into_a_session_nobody_resumed_is_cancelled_when_the_grace_runs_out() -> None:
    flood = _Flood()
    app = sse_app(_server(flood), transport_security=OPEN, config=SseConfig(session_grace=0.2))
    transport: SseServerTransport = app.state.sse_transport
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            async with RawSseStream.open(base) as raw:
                await _call_flood(raw, http, flood)
            with anyio.fail_after(0.2 + 1):
                await flood.stopped.wait()
            assert flood.ended_by_its_session and transport.statistics().open_sessions == 0


# -- the POST URL is no read capability ------------------------------------------------------


async def _first_events(base: str, headers: dict[str, str], count: int) -> list[SseEvent]:
    async with RawSseStream.open(base, headers=headers) as raw:
        events = [await raw.next_event() for _ in range(count)]
    assert all(event is not None for event in events)
    return [event for event in events if event is not None]


async def test_a_resume_built_from_the_post_url_is_unknown_and_leaves_the_owners_stream_alone() -> None:
    flood = _Flood()
    with anyio.fail_after(20):
        async with serving(sse_app(_server(flood), transport_security=OPEN)) as base:
            async with RawSseStream.open(base) as owner, httpx2.AsyncClient(base_url=base) as http:
                post_url = await initialize(owner, http)
                session_id = post_url.split("session_id=")[1]
                for forged in (f"{session_id}:0", f"{session_id}:1", f"{session_id}.{session_id}:0"):
                    error, endpoint = await _first_events(base, {"Last-Event-ID": forged}, 2)
                    assert error.event == "error" and error.json()["code"] == ErrorCode.RESUME_UNKNOWN
                    assert endpoint.event == "endpoint" and session_id not in endpoint.data
                # The owner's stream was neither read nor superseded: it still carries its session.
                ping = {"jsonrpc": "2.0", "id": "still-mine", "method": "ping"}
                assert (await http.post(post_url, json=ping)).status_code == 202
                answer = await owner.next_event()
                assert answer is not None and answer.json() == {"jsonrpc": "2.0", "id": "still-mine", "result": {}}
                assert answer.id is not None and answer.id.startswith(f"{session_id}.")


# -- any Starlette authentication binds a session to its user ----------------------------------


class _UserFromHeader(AuthenticationBackend):
    """Starlette's own authentication, not the SDK's bearer auth: ``x-user`` names the user."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.headers.get("x-user")
        return None if name is None else (AuthCredentials(["authenticated"]), SimpleUser(name))


async def test_a_session_opened_under_any_starlette_authentication_answers_only_its_user() -> None:
    flood = _Flood()
    app = sse_app(_server(flood), transport_security=OPEN)
    app.user_middleware.insert(0, Middleware(AuthenticationMiddleware, backend=_UserFromHeader()))
    alice, mallory = {"x-user": "alice"}, {"x-user": "mallory"}
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            async with RawSseStream.open(base, headers=alice) as raw:
                endpoint = await raw.next_event()
                assert endpoint is not None and endpoint.id is not None
                resume_id, post_url = endpoint.id, endpoint.data
                for other in (mallory, {}):  # another user, and nobody
                    ping = {"jsonrpc": "2.0", "id": "x", "method": "ping"}
                    assert (await http.post(post_url, json=ping, headers=other)).status_code == 404
                    error, _ = await _first_events(base, {**other, "Last-Event-ID": resume_id}, 2)
                    assert error.json()["code"] == ErrorCode.RESUME_UNKNOWN
                ping = {"jsonrpc": "2.0", "id": "alice", "method": "ping"}
                assert (await http.post(post_url, json=ping, headers=alice)).status_code == 202
                answer = await raw.next_event()
                assert answer is not None and answer.json()["id"] == "alice"
            # Alice herself resumes the session she opened.
            (resumed,) = await _first_events(base, {**alice, "Last-Event-ID": resume_id}, 1)
            assert resumed.event == "endpoint" and resumed.data == post_url


# -- request ids are bounded in bytes ----------------------------------------------------------


def _rss() -> int:
    """This process's resident set now, in bytes (uvicorn serves from this process)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_request_ids_over_the_limit_get_an_error_and_are_never_remembered() -> None:
    config = SseConfig()
    big_id = "x" * (1024 * 1024)
    with anyio.fail_after(120):
        async with serving(sse_app(_server(_Flood()), transport_security=OPEN, config=config)) as base:
            async with RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
                post_url = await initialize(raw, http)
                body = json.dumps({"jsonrpc": "2.0", "id": big_id, "method": "ping"})
                headers = {"content-type": "application/json"}
                baseline = 0
                for n in range(500):
                    if n == 20:  # past warm-up: allocator arenas and buffers at their working size
                        baseline = _rss()
                    response = await http.post(post_url, content=body, headers=headers)
                    assert response.status_code == 400
                    assert response.json() == {
                        "jsonrpc": "2.0",
                        "id": None,
                        "error": {
                            "code": ErrorCode.INVALID_REQUEST,
                            "message": "Request id too long",
                            "data": {"max_request_id_bytes": config.max_request_id_bytes},
                        },
                    }
                    event = await raw.next_event()
                    assert event is not None and event.event == "error"
                    assert event.json()["code"] == ErrorCode.INVALID_REQUEST
                growth = _rss() - baseline
                print(f"\n1 MiB request ids: RSS {baseline / 2**20:.1f} MiB, then +{growth / 2**20:.1f} MiB")
                # Remembered, 480 such ids would hold 480 MiB; refused, nothing of them stays.
                assert growth < 64 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"
                # An id at the limit is an ordinary request, and the session went on throughout.
                longest = "y" * (config.max_request_id_bytes - 2)  # its JSON: the quotes count
                assert (
                    await http.post(post_url, json={"jsonrpc": "2.0", "id": longest, "method": "ping"})
                ).status_code == 202
                answer = await raw.next_event()
                assert answer is not None and answer.json() == {"jsonrpc": "2.0", "id": longest, "result": {}}
