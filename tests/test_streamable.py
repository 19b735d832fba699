"""The Streamable HTTP front end over a real uvicorn and raw HTTP: what opens a session and what
does not, the statuses of bad requests, whose session a request may use, DELETE, idle expiry,
JSON responses, and the drop-in's constructor."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, BaseUser, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mcp_sse_transport import (
    ErrorCode,
    InMemoryEventStore,
    SseConfig,
    StreamableHTTPSessionManager,
    streamable_http_app,
)
from mcp_sse_transport.errors import StoreError

from ._sdk_compat import Context, MCPServer, lowlevel_of
from ._sdk_compat import httpx as httpx2
from ._streamable import INITIALIZE, Logged, asgi_errors, data, headers, message, open_session
from ._support import RawSseStream, serving

pytestmark = pytest.mark.anyio


def _server() -> MCPServer:
    server = MCPServer("front")

    @server.tool()
    def echo(text: str) -> str:
        return text

    return server


async def _post(base: str, body: bytes, **sent: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=5) as client:
        return await client.post(f"{base}/mcp", content=body, headers=sent)


def _error(response: httpx2.Response) -> tuple[int, int, str]:
    body = response.json()
    assert body["id"] is None
    return response.status_code, body["error"]["code"], body["error"]["message"]


# -- opening sessions ---------------------------------------------------------------------------


async def test_only_an_initialize_opens_a_session_and_bad_requests_open_none() -> None:
    app = streamable_http_app(_server())
    manager: StreamableHTTPSessionManager = app.state.session_manager
    async with serving(app) as base:
        with anyio.fail_after(15):
            ping = message("ping", 1)
            assert _error(await _post(base, ping, **headers())) == (400, -32600, "Bad Request: Missing session ID")
            assert _error(await _post(base, b"{not json", **headers()))[:2] == (400, ErrorCode.PARSE_ERROR)
            assert _error(await _post(base, b'{"jsonrpc": "2.0"}', **headers()))[:2] == (400, -32602)
            refused = await _post(base, INITIALIZE, **headers(accept="application/json"))
            assert refused.status_code == 406
            refused = await _post(base, INITIALIZE, **headers(**{"content-type": "text/plain"}))
            assert (refused.status_code, refused.text) == (400, "Invalid Content-Type header")  # the SDK's check
            async with httpx2.AsyncClient(timeout=5) as client:
                assert (await client.get(f"{base}/mcp", headers=headers())).status_code == 400
                assert (await client.delete(f"{base}/mcp", headers=headers())).status_code == 400
                put = await client.put(f"{base}/mcp", headers=headers())
                assert put.status_code == 405 and put.headers["allow"] == "GET, POST, DELETE"
            assert manager._server_instances == {}
            session_id = await open_session(base)
            assert list(manager._server_instances) == [session_id]


async def test_an_unknown_or_malformed_session_id_is_not_found() -> None:
    async with serving(streamable_http_app(_server())) as base:
        with anyio.fail_after(15):
            await open_session(base)
            for unknown in ("0" * 32, "not-a-session", "x" * 300):
                response = await _post(base, message("ping", 1), **headers(unknown))
                assert _error(response) == (404, -32600, "Session not found")


async def test_a_request_id_too_long_is_refused_with_an_error() -> None:
    config = SseConfig(max_request_id_bytes=16)
    async with serving(streamable_http_app(_server(), config=config)) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base)
            response = await _post(base, message("ping", "x" * 40), **headers(session_id))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == ErrorCode.INVALID_REQUEST


# -- whose session ------------------------------------------------------------------------------


class _HeaderUser(AuthenticationBackend):
    """Authenticates the user an ``x-user`` header names."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        name = conn.headers.get("x-user")
        return (AuthCredentials(["user"]), SimpleUser(name)) if name else None


@asynccontextmanager
async def _authenticated(manager: StreamableHTTPSessionManager) -> AsyncIterator[str]:
    class Endpoint:
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await manager.handle_request(scope, receive, send)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    app = Starlette(
        routes=[Route("/mcp", endpoint=Endpoint())],
        middleware=[Middleware(AuthenticationMiddleware, backend=_HeaderUser())],
        lifespan=lifespan,
    )
    async with serving(app) as base:
        yield base


async def test_a_session_answers_only_the_credential_that_opened_it() -> None:
    manager = StreamableHTTPSessionManager(lowlevel_of(_server()))
    async with _authenticated(manager) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base, extra={"x-user": "alice"})
            mallory = await _post(base, message("ping", 1), **headers(session_id, **{"x-user": "mallory"}))
            anonymous = await _post(base, message("ping", 2), **headers(session_id))
            alice = await _post(base, message("ping", 3), **headers(session_id, **{"x-user": "alice"}))
    assert _error(mallory) == _error(anonymous) == (404, -32600, "Session not found")
    assert alice.status_code == 200 and data(alice.text) == [{"jsonrpc": "2.0", "id": 3, "result": {}}]


# -- ending sessions ----------------------------------------------------------------------------


async def test_delete_ends_the_session_and_answers_a_waiting_request() -> None:
    started, release = anyio.Event(), anyio.Event()
    server = MCPServer("delete")

    @server.tool()
    async def hold(ctx: Context) -> str:
        started.set()
        await release.wait()
        return "held"

    async with serving(streamable_http_app(server)) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base)
            call = message("tools/call", 1, {"name": "hold", "arguments": {}})
            async with RawSseStream.open(base, "/mcp", headers(session_id), post=call) as waiting:
                await started.wait()
                async with httpx2.AsyncClient(timeout=5) as client:
                    deleted = await client.delete(f"{base}/mcp", headers=headers(session_id))
                    assert deleted.status_code == 200
                    after = await _post(base, message("ping", 2), **headers(session_id))
                    assert _error(after) == (404, -32600, "Session not found")
                await waiting.drain()
    answers = [event for event in data(waiting.body.decode()) if event.get("id") == 1]
    assert answers == [{"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "Session terminated"}}]


async def test_a_session_idle_for_session_idle_timeout_ends_and_its_id_is_not_found(
    caplog: pytest.LogCaptureFixture,
) -> None:
    manager = StreamableHTTPSessionManager(lowlevel_of(_server()), session_idle_timeout=0.2)
    caplog.set_level(logging.INFO, logger="mcp_sse_transport")
    idle = Logged("idle for")
    logger = logging.getLogger("mcp_sse_transport")
    logger.addHandler(idle)
    try:
        async with _authenticated(manager) as base:
            with anyio.fail_after(15):
                session_id = await open_session(base)
                await idle.seen.wait()
                response = await _post(base, message("ping", 1), **headers(session_id))
    finally:
        logger.removeHandler(idle)
    assert _error(response) == (404, -32600, "Session not found")
    assert manager._server_instances == {}


async def test_an_open_stream_holds_the_session_open_past_its_idle_timeout(caplog: pytest.LogCaptureFixture) -> None:
    """A request in flight (here the standalone GET stream) holds the session: no idle deadline
    runs while it is open, and the countdown starts once the last one ended."""
    manager = StreamableHTTPSessionManager(lowlevel_of(_server()), session_idle_timeout=0.2)
    caplog.set_level(logging.INFO, logger="mcp_sse_transport")
    idle = Logged("idle for")
    logger = logging.getLogger("mcp_sse_transport")
    logger.addHandler(idle)
    try:
        async with _authenticated(manager) as base:
            with anyio.fail_after(15):
                session_id = await open_session(base)
                hosted = manager._server_instances[session_id]
                async with RawSseStream.open(base, "/mcp", headers(session_id)) as standalone:
                    assert standalone.status == 200
                    ping = await _post(base, message("ping", 1), **headers(session_id))
                    assert ping.status_code == 200  # a request that ended under the open stream
                    assert hosted._idle.deadline == math.inf
                await idle.seen.wait()
    finally:
        logger.removeHandler(idle)
    assert manager._server_instances == {}


# -- JSON responses -------------------------------------------------------------------------------


async def test_json_responses_answer_a_request_with_its_answer_as_the_body() -> None:
    server = MCPServer("json")

    @server.tool()
    async def chatty(ctx: Context) -> str:
        await ctx.report_progress(1, 2)  # its own notification: no room for it in a JSON body
        return "answer"

    async with serving(streamable_http_app(server, json_response=True)) as base:
        with anyio.fail_after(15):
            session_id = await open_session_json(base)
            call = message("tools/call", 1, {"name": "chatty", "arguments": {}, "_meta": {"progressToken": 1}})
            response = await _post(base, call, **headers(session_id, accept="application/json"))
            notified = await _post(base, message("notifications/roots/list_changed"), **headers(session_id))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.headers["mcp-session-id"] == session_id
    body: dict[str, Any] = response.json()
    assert body["id"] == 1 and body["result"]["content"][0]["text"] == "answer"
    assert notified.status_code == 202


async def open_session_json(base: str) -> str:
    initialized = await _post(base, INITIALIZE, **headers(accept="application/json"))
    assert initialized.status_code == 200 and initialized.json()["id"] == 0
    session_id = initialized.headers["mcp-session-id"]
    notified = await _post(base, message("notifications/initialized"), **headers(session_id))
    assert notified.status_code == 202
    return session_id


# -- the drop-in's constructor ------------------------------------------------------------------


def test_the_constructor_validates_as_stock_and_maps_its_arguments_onto_the_config() -> None:
    lowlevel = lowlevel_of(_server())
    for bad in ({"session_idle_timeout": 0}, {"max_request_body_size": 0}, {"max_sessions": 0}):
        with pytest.raises(ValueError, match="must be a positive"):
            StreamableHTTPSessionManager(lowlevel, **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="redis_url"):
        StreamableHTTPSessionManager(lowlevel, config=SseConfig(redis_url="redis://127.0.0.1:1/0"))
    manager = StreamableHTTPSessionManager(lowlevel, retry_interval=250, max_sessions=7)
    assert manager.config.retry_interval == 0.25 and manager.config.max_sessions == 7


async def test_run_can_be_entered_once_and_requests_need_it() -> None:
    manager = StreamableHTTPSessionManager(lowlevel_of(_server()))
    scope: Scope = {"type": "http", "method": "GET", "path": "/mcp", "headers": []}

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(_: Any) -> None:
        pass

    with pytest.raises(RuntimeError, match="run"):
        await manager.handle_request(scope, receive, send)
    async with manager.run():
        pass
    with pytest.raises(RuntimeError, match="once"):
        async with manager.run():
            pass


async def test_the_event_store_given_is_the_one_used_even_when_empty() -> None:
    store = InMemoryEventStore(max_events=5)
    assert not store, "an empty in-memory store is falsy"
    manager = StreamableHTTPSessionManager(lowlevel_of(_server()), event_store=store)
    assert manager._store is store


class _FailingDrops(InMemoryEventStore):
    """Keeps events, but cannot drop them (a store that went away): the sessions must go on."""

    def __init__(self) -> None:
        super().__init__()
        self.tried = anyio.Event()

    async def drop(self, session_id: str) -> None:
        self.tried.set()
        raise StoreError("the store is down")


async def test_a_store_that_cannot_drop_a_log_ends_no_session(caplog: pytest.LogCaptureFixture) -> None:
    store = _FailingDrops()
    app = streamable_http_app(_server(), event_store=store, config=SseConfig(session_grace=0.01))
    async with serving(app) as base:
        with anyio.fail_after(15), asgi_errors() as escaped:
            session_id = await open_session(base)
            first = await _post(base, message("ping", 1), **headers(session_id))
            await store.tried.wait()  # an answered stream retired, its log's drop failed
            second = await _post(base, message("ping", 2), **headers(session_id))
            async with httpx2.AsyncClient(timeout=5) as client:
                deleted = await client.delete(f"{base}/mcp", headers=headers(session_id))
            other = await open_session(base)  # the manager serves on
    assert first.status_code == second.status_code == deleted.status_code == 200
    assert other != session_id
    assert any("was not dropped" in record.getMessage() for record in caplog.records)
    assert not escaped.seen.is_set()
