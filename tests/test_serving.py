"""serving: sse_app (routes, defaults, an MCPServer's auth and routes), uvicorn_server and its
drain on shutdown, run, the H11Protocol's abort extension, and the access log's redaction, on a
real uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mcp_sse_transport import ErrorCode, SseConfig, SseServerTransport, StreamableHTTPSessionManager
from mcp_sse_transport import serving as serving_module
from mcp_sse_transport._asgi import ABORT_EXTENSION, end_stream, open_stream
from mcp_sse_transport.serving import (
    H11Protocol,
    _redact_session_ids,
    _RedactSessionIds,
    sse_app,
    streamable_http_app,
    uvicorn_server,
)

from ._cluster import uvicorn_cli
from ._sdk_compat import EXAMPLE_MODULE, MAJOR, Client, MCPServer, sse_client, streamable_http_client, types
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, free_socket, serving
from .test_integration import OPEN, initialize, lowlevel_server
from .test_resume import start_session
from .test_stalled_reset import _read_to_the_end, _server_sockets

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
SESSION = "0123456789abcdef0123456789abcdef"
SECRET = "fedcba9876543210fedcba9876543210"


async def endpoint_of(raw: RawSseStream) -> str:
    endpoint = await raw.next_event()
    assert endpoint is not None and endpoint.event == "endpoint"
    return endpoint.data


def test_exports() -> None:
    assert set(serving_module.__all__) == {
        "H11Protocol",
        "Transport",
        "run",
        "sse_app",
        "streamable_http_app",
        "uvicorn_server",
    }


# -- sse_app ----------------------------------------------------------------------------------------


async def test_sse_app_serves_the_stream_at_sse_and_posts_under_messages_by_default() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    assert isinstance(app.state.sse_transport, SseServerTransport)
    with anyio.fail_after(20):
        async with serving(app) as base, RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
            post_url = await initialize(raw, http)
            assert post_url.startswith("/messages/?session_id=")


async def test_sse_app_at_other_paths() -> None:
    app = sse_app(lowlevel_server(), sse_path="/events", message_path="/rpc/", transport_security=OPEN)
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            assert (await http.get("/sse")).status_code == 404
            async with RawSseStream.open(base, "/events") as raw:
                post_url = await initialize(raw, http)
                assert post_url.startswith("/rpc/?session_id=")
            assert (await http.post(f"/messages/?session_id={SESSION}", json={})).status_code == 404


def test_sse_app_passes_its_config_to_the_transport() -> None:
    config = SseConfig(retry_interval=0.5, max_buffered_events=10)
    assert sse_app(lowlevel_server(), config=config).state.sse_transport.config is config
    assert sse_app(lowlevel_server()).state.sse_transport.config == SseConfig()


async def test_local_hosts_get_dns_rebinding_protection_by_default() -> None:
    with anyio.fail_after(20):
        async with serving(sse_app(lowlevel_server())) as base, httpx2.AsyncClient(base_url=base) as http:
            rebound = await http.get("/sse", headers={"Host": "attacker.example"})
            assert (rebound.status_code, rebound.text) == (421, "Invalid Host header")
            foreign = await http.get("/sse", headers={"Origin": "http://attacker.example"})
            assert (foreign.status_code, foreign.text) == (403, "Invalid Origin header")
            async with RawSseStream.open(base) as allowed:
                endpoint = await allowed.next_event()
                assert endpoint is not None and endpoint.event == "endpoint"


@pytest.mark.parametrize("host", ["0.0.0.0", "mcp.example"])
async def test_other_hosts_get_no_rebinding_protection_by_default(host: str) -> None:
    with anyio.fail_after(20):
        async with serving(sse_app(lowlevel_server(), host=host)) as base, httpx2.AsyncClient(base_url=base) as http:
            async with http.stream("GET", "/sse", headers={"Host": "attacker.example"}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream; charset=utf-8"


async def test_transport_security_given_replaces_the_local_default() -> None:
    with anyio.fail_after(20):
        async with serving(sse_app(lowlevel_server(), transport_security=OPEN)) as base:
            async with httpx2.AsyncClient(base_url=base) as http:
                async with http.stream("GET", "/sse", headers={"Host": "attacker.example"}) as response:
                    assert response.status_code == 200


async def test_max_request_body_size_bounds_a_post() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN, max_request_body_size=600)
    with anyio.fail_after(20):
        async with serving(app) as base, RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
            post_url = await initialize(raw, http)
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * 400}}
            assert (await http.post(post_url, json=ping)).status_code == 202
            big = {"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {"pad": "x" * 600}}
            refused = await http.post(post_url, json=big)
            assert (refused.status_code, refused.text) == (413, "Request body too large")


async def test_an_mcp_servers_custom_routes_are_served_beside_the_stream() -> None:
    server = MCPServer("custom")

    @server.custom_route("/health", methods=["GET"])  # type: ignore[untyped-decorator]
    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    with anyio.fail_after(20):
        async with serving(sse_app(server)) as base, httpx2.AsyncClient(base_url=base) as http:
            answer = await http.get("/health")
            assert (answer.status_code, answer.text) == (200, "ok")
            async with RawSseStream.open(base) as raw:
                assert (await endpoint_of(raw)).startswith("/messages/?session_id=")


class _Tokens:
    """The SDK's TokenVerifier: ``good`` has the scope the server requires, ``weak`` none."""

    async def verify_token(self, token: str) -> AccessToken | None:
        scopes = {"good": ["tools"], "weak": []}.get(token)
        return None if scopes is None else AccessToken(token=token, client_id="client", scopes=scopes)


async def test_an_mcp_servers_bearer_auth_guards_the_stream_and_the_posts() -> None:
    auth = AuthSettings(
        issuer_url=AnyHttpUrl("https://auth.example"),
        resource_server_url=AnyHttpUrl("https://mcp.example"),
        required_scopes=["tools"],
        validate_token_resource=False,
    )
    server = MCPServer("guarded", token_verifier=_Tokens(), auth=auth)
    with anyio.fail_after(20):
        async with serving(sse_app(server)) as base, httpx2.AsyncClient(base_url=base) as http:
            anonymous = await http.get("/sse")
            assert anonymous.status_code == 401
            assert "resource_metadata=" in anonymous.headers["www-authenticate"]
            assert (await http.get("/sse", headers={"Authorization": "Bearer forged"})).status_code == 401
            assert (await http.get("/sse", headers={"Authorization": "Bearer weak"})).status_code == 403
            assert (await http.post(f"/messages/?session_id={SESSION}", json={})).status_code == 401
            metadata = await http.get("/.well-known/oauth-protected-resource")
            assert metadata.status_code == 200
            assert metadata.json()["resource"].rstrip("/") == "https://mcp.example"
            assert metadata.json()["scopes_supported"] == ["tools"]
            async with RawSseStream.open(base, headers={"Authorization": "Bearer good"}) as raw:
                assert raw.status == 200
                assert (await endpoint_of(raw)).startswith("/messages/?session_id=")


# -- streamable_http_app and both transports --------------------------------------------------------


def _echo_server() -> MCPServer:
    server = MCPServer("both")

    @server.tool()
    def echo(text: str) -> str:
        return text

    @server.custom_route("/health", methods=["GET"])  # type: ignore[untyped-decorator]
    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return server


async def _echo_over(client: Client) -> str:
    result = await client.call_tool("echo", {"text": "hi"})
    return "".join(content.text for content in result.content if isinstance(content, types.TextContent))


async def test_one_app_serves_both_transports_to_the_sdk_clients_and_drains_both() -> None:
    """``transport="both"``: ``/sse`` and ``/mcp`` from one app, each with the SDK's own client,
    the server's custom routes once; shutdown drains both."""
    server = uvicorn_server(_echo_server(), port=0, transport="both", log_level="warning")
    app = server.config.app
    assert isinstance(app, Starlette)
    assert isinstance(app.state.sse_transport, SseServerTransport)
    assert isinstance(app.state.session_manager, StreamableHTTPSessionManager)
    assert [getattr(route, "path", None) for route in app.routes].count("/health") == 1
    with anyio.fail_after(30):
        async with serving(app) as base:
            async with Client(sse_client(f"{base}/sse"), mode="legacy") as legacy:
                assert await _echo_over(legacy) == "hi"
            async with Client(streamable_http_client(f"{base}/mcp"), mode="legacy") as streamable:
                assert await _echo_over(streamable) == "hi"
            if MAJOR >= 2:  # protocol 2026-07-28, the SDK's modern era, is 2.x's
                async with Client(streamable_http_client(f"{base}/mcp"), mode="2026-07-28") as modern:
                    assert await _echo_over(modern) == "hi"
            async with httpx2.AsyncClient(base_url=base) as http:
                assert (await http.get("/health")).text == "ok"


async def test_streamable_http_app_wires_an_mcp_servers_bearer_auth() -> None:
    auth = AuthSettings(
        issuer_url=AnyHttpUrl("https://auth.example"),
        resource_server_url=AnyHttpUrl("https://mcp.example"),
        required_scopes=["tools"],
        validate_token_resource=False,
    )
    server = MCPServer("guarded", token_verifier=_Tokens(), auth=auth)
    with anyio.fail_after(20):
        async with serving(streamable_http_app(server)) as base, httpx2.AsyncClient(base_url=base) as http:
            body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            anonymous = await http.post("/mcp", json=body)
            assert anonymous.status_code == 401 and "resource_metadata=" in anonymous.headers["www-authenticate"]
            weak = await http.post("/mcp", json=body, headers={"Authorization": "Bearer weak"})
            assert weak.status_code == 403
            metadata = await http.get("/.well-known/oauth-protected-resource")
            assert metadata.status_code == 200


# -- uvicorn_server -----------------------------------------------------------------------------------


def test_uvicorn_server_installs_the_h11_protocol_unless_told_otherwise() -> None:
    app = sse_app(lowlevel_server())
    server = uvicorn_server(app, port=0)
    assert isinstance(server, uvicorn.Server)
    assert server.config.http is H11Protocol
    assert (server.config.host, server.config.port, server.config.log_level) == ("127.0.0.1", 0, "info")
    assert uvicorn_server(app, http="h11").config.http == "h11"
    assert server.config.app is app, "an app from sse_app is served as it is"


def test_uvicorn_server_builds_the_app_of_a_server_with_its_config() -> None:
    config = SseConfig(retry_interval=0.5)
    server = uvicorn_server(lowlevel_server(), host="127.0.0.1", port=9, config=config, log_level="warning")
    app = server.config.app
    assert isinstance(app, Starlette)
    assert app.state.sse_transport.config is config
    assert server.config.log_level == "warning"


def test_uvicorn_server_installs_the_access_log_redaction_once() -> None:
    uvicorn_server(sse_app(lowlevel_server()))
    uvicorn_server(sse_app(lowlevel_server()))
    access_filters = logging.getLogger("uvicorn.access").filters
    assert [f for f in access_filters if isinstance(f, _RedactSessionIds)] == [_redact_session_ids]


async def test_a_shutdown_drains_the_streams_as_it_starts() -> None:
    """uvicorn waits for every connection to end before its lifespan shutdown: the server's own
    shutdown ends the event streams first, or it would wait for them forever."""
    sock = free_socket()
    port = sock.getsockname()[1]
    app = sse_app(lowlevel_server(), transport_security=OPEN, config=SseConfig(retry_interval=1.5))
    server = uvicorn_server(app, port=port, log_level="warning")
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            async with RawSseStream.open(f"http://127.0.0.1:{port}") as raw:
                await endpoint_of(raw)
                server.should_exit = True
                final = await raw.next_event()
                assert final is not None and final.event == "error" and final.retry == 1500
                assert json.loads(final.data)["code"] == ErrorCode.SERVER_SHUTDOWN
                assert await raw.next_event() is None
                assert raw.ended
        # serve() returned: the task group is done
    sock.close()


async def test_a_plain_app_without_a_transport_serves_and_shuts_down() -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn_server(Starlette(routes=[Route("/", hello)]), port=port, log_level="warning")
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                assert (await http.get("/")).text == "hello"
            server.should_exit = True
    sock.close()


# -- run --------------------------------------------------------------------------------------------


async def test_run_serves_on_the_sockets_it_is_given_until_sigterm() -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    code = (
        "import socket, sys\n"
        f"from {EXAMPLE_MODULE} import mcp\n"
        "from mcp_sse_transport import run\n"
        "run(mcp, sockets=[socket.socket(fileno=int(sys.argv[1]))], log_level='info')\n"
    )
    with anyio.fail_after(30):
        async with await anyio.open_process(
            [sys.executable, "-c", code, str(sock.fileno())],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            pass_fds=[sock.fileno()],
        ) as process:
            sock.close()  # the child's copy listens; connections queue in its backlog meanwhile
            async with RawSseStream.open(f"http://127.0.0.1:{port}") as raw:
                assert (await endpoint_of(raw)).startswith("/messages/?session_id=")
                process.send_signal(signal.SIGTERM)
                await raw.drain()
                assert raw.ended
            assert process.stderr is not None
            log = b"".join([chunk async for chunk in process.stderr])
            assert await process.wait() == -signal.SIGTERM, log.decode(errors="replace")
            assert b"Finished server process" in log


# -- H11Protocol ------------------------------------------------------------------------------------


async def _offered(request: Request) -> JSONResponse:
    extension = request.scope.get("extensions", {}).get(ABORT_EXTENSION)
    if extension is None:
        return JSONResponse(None)
    return JSONResponse({name: callable(value) for name, value in extension.items()})


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_the_h11_protocol_offers_abort_and_send_buffer_to_every_request(method: str) -> None:
    app = Starlette(routes=[Route("/offered", _offered, methods=[method])])
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            for _ in range(2):  # and to every request on a kept-alive connection
                answer = await http.request(method, "/offered")
                assert answer.json() == {"abort": True, "set_send_buffer": True}


async def test_uvicorns_own_h11_protocol_offers_nothing() -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn_server(Starlette(routes=[Route("/offered", _offered)]), port=port, log_level="warning", http="h11")
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: server.serve(sockets=[sock]))
            async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                assert (await http.get("/offered")).json() is None
            server.should_exit = True
    sock.close()


class _Raw:
    """A raw ASGI function as a route's endpoint (an instance: Starlette passes the ASGI triple on)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


class _Held:
    """A response whose head is sent after ``prepare(scope)``; it is held open until ``release``."""

    def __init__(self) -> None:
        self.sent = anyio.Event()
        self.release = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["extensions"][ABORT_EXTENSION]["set_send_buffer"](48 * 1024)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        self.sent.set()
        await self.release.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_set_send_buffer_caps_the_sockets_kernel_send_buffer() -> None:
    held = _Held()
    app = Starlette(routes=[Route("/held", held)])
    with anyio.fail_after(20):
        async with serving(app) as base, RawSseStream.open(base, "/held") as raw:
            await held.sent.wait()
            client_port = raw.stream.extra(anyio.abc.SocketAttribute.local_port)
            [server_socket] = await _server_sockets(int(base.rsplit(":", 1)[1]), client_port)
            assert server_socket.send_buffer == 2 * 48 * 1024  # Linux doubles the value set
            held.release.set()
            await raw.drain()


async def test_abort_resets_a_connection_whose_client_left_bytes_unread() -> None:
    aborted = anyio.Event()

    async def flood(scope: Scope, receive: Receive, send: Send) -> None:
        sink = await open_stream(send, scope, 16 * 1024)
        async with anyio.create_task_group() as tg:

            async def write_forever() -> None:
                while True:
                    await sink(b"data: " + b"x" * 65536 + b"\r\n\r\n")

            tg.start_soon(write_forever)
            # Once nothing can run, the writer waits for uvicorn's buffer to drain: it holds bytes.
            await anyio.wait_all_tasks_blocked()
            scope["extensions"][ABORT_EXTENSION]["abort"]()
            tg.cancel_scope.cancel()
        aborted.set()
        await end_stream(scope, send, True, 1.0)

    app = Starlette(routes=[Route("/flood", _Raw(flood))])
    with anyio.fail_after(30):
        async with serving(app) as base, RawSseStream.open(base, "/flood", rcvbuf=4096) as stalled:
            await aborted.wait()
            _, ending = await _read_to_the_end(stalled)
            assert isinstance(ending, anyio.BrokenResourceError), ending
            assert isinstance(ending.__cause__, ConnectionResetError), ending.__cause__


# -- the access log's redaction ---------------------------------------------------------------------


def _access_record(*args: Any) -> logging.LogRecord:
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)


def test_the_access_log_keeps_eight_characters_of_a_session_id() -> None:
    record = _access_record("127.0.0.1:5000", "POST", f"/messages/?session_id={SESSION}", "1.1", 202)
    assert _RedactSessionIds().filter(record) is True
    assert record.getMessage() == '127.0.0.1:5000 - "POST /messages/?session_id=01234567… HTTP/1.1" 202'


def test_the_access_log_keeps_eight_characters_of_a_last_event_id_and_the_rest_of_the_query() -> None:
    path = f"/sse?last_event_id={SESSION}.{SECRET}%3A17&after=1"
    record = _access_record("127.0.0.1:5000", "GET", path, "1.1", 200)
    _RedactSessionIds().filter(record)
    message = record.getMessage()
    assert "/sse?last_event_id=01234567…&after=1" in message
    assert SECRET not in message and SESSION not in message


def test_the_access_log_redaction_is_case_blind_in_the_hex_and_leaves_other_values() -> None:
    upper = SESSION.upper()
    record = _access_record("127.0.0.1:5000", "POST", f"/messages/?session_id={upper}", "1.1", 404)
    _RedactSessionIds().filter(record)
    assert upper not in record.getMessage()
    for untouched in ("/messages/?session_id=0123", "/messages/?session_id=not-hex-at-all", "/sse?other=" + SESSION):
        record = _access_record("127.0.0.1:5000", "POST", untouched, "1.1", 400)
        assert _RedactSessionIds().filter(record) is True
        assert untouched in record.getMessage()


def test_the_access_log_redaction_passes_records_without_tuple_arguments() -> None:
    mapping = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "%(path)s", None, None)
    mapping.args = {"path": f"session_id={SESSION}"}
    assert _RedactSessionIds().filter(mapping) is True
    assert mapping.args == {"path": f"session_id={SESSION}"}
    plain = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, f"session_id={SESSION}", None, None)
    assert _RedactSessionIds().filter(plain) is True
    assert plain.args is None


async def test_uvicorns_own_command_line_with_the_protocol_redacts_the_access_log(
    redis_url: str, redis_prefix: str
) -> None:
    """``uvicorn --http mcp_sse_transport.serving:H11Protocol`` (the documented deployment) runs
    neither ``uvicorn_server`` nor ``run``: the protocol installs the redaction itself."""
    with anyio.fail_after(60):
        async with uvicorn_cli(redis_url, redis_prefix) as worker:
            async with httpx2.AsyncClient(base_url=worker.url) as http, RawSseStream.open(worker.url) as raw:
                post_url = await start_session(raw, http, retry_ms=100)
                session_id = post_url.split("session_id=")[1]
                assert (
                    await http.post(post_url, json={"jsonrpc": "2.0", "method": "ping", "id": 1})
                ).status_code == 202
                await worker.logged(b"POST /messages/?session_id=")  # the access log's line for it
    assert session_id.encode() not in worker.log
    assert f"POST /messages/?session_id={session_id[:8]}…".encode() in worker.log
