"""The benchmark server, run as its own process: ``python -m bench.server --impl stock|ours``.

One process per transport, so each one's RSS is read from ``/proc/<pid>/status`` with nothing
else in it. It binds 127.0.0.1 port 0, prints ``READY <port>`` on stdout, and serves under a real
uvicorn (h11, asyncio loop, no access log) until SIGTERM. The app is the same for both transports:

- ``GET /push?n=N&size=S``    transport alone: on session open push N notifications of S bytes
                              (serialized) into the write stream of ``connect_sse``, then close it.
- ``GET /flood?tag=T&size=S`` stalled-client producer: push until the write stream fails (or the
                              ``max`` count / ``cap`` seconds are reached); progress under ``/stats``.
- ``GET /idle``               a session that holds its streams open and does nothing.
- ``GET /floor``              no transport at all: a bare ASGI streaming response that sends one
                              endpoint-like event and waits for the disconnect. The per-connection
                              memory floor of uvicorn + h11 + Starlette routing, for reference.
- ``GET /replay?tag=T&n=N&size=S``
                              resumption: send one notification, wait until ``/replay/go`` says the
                              client is gone, push N notifications of S bytes into the detached
                              session, then hold it open. The same GET with ``Last-Event-ID`` is a
                              resume (ours: ``connect_sse`` replays; the body does nothing).
- ``GET /replay/go?tag=T&session=I``
                              wait until session I (its id from the endpoint URL) has no connection
                              attached (ours; stock has no such state), start T's push and answer,
                              as JSON, once all N are in the session.
- ``GET /sse``                a full SDK lowlevel ``Server`` (tool ``progress``, ping).
- ``/messages/``              the transport's POST endpoint.
- ``GET /stats?tag=T``        the flood producer's progress, as JSON.

With ``--redis-url`` (ours only) the transport keeps its sessions in that Redis
(``SseConfig(redis_url=...)``, the lowlevel ``Server`` passed as ``server=`` for the sessions it
takes over, the transport entered for the server's life), so several of these processes sharing
one Redis are workers of one deployment; ``--redis-prefix`` and ``--owner-lease`` as in
``SseConfig``. Everything else is as without it.

With ``--transport streamable`` the app is Streamable HTTP instead (``build_streamable_app``): the
session manager (stock: ``mcp.server.streamable_http_manager.StreamableHTTPSessionManager``; ours:
``mcp_sse_transport.StreamableHTTPSessionManager`` with ``SseConfig``, ``--grant-timeout`` and
``--write-timeout`` as above), its ``run()`` entered for the server's life, serving the lowlevel
``Server`` with two more tools on the call's own response stream:

- ``/mcp``                    the manager's endpoint (POST, GET, DELETE), as a raw ASGI app.
- tool ``flood``              (``tag``, ``size``, ``cap``) the ``/flood`` producer, as ``size``-byte
                              progress notifications; progress under ``/stats?tag=T``.
- tool ``replay``             (``tag``, ``n``, ``size``) the ``/replay`` producer: one notification,
                              then ``n`` more once ``/replay/go?tag=T&session=I&stream=S`` saw the
                              response stream S (from its event ids) detached (ours), then the answer.

Stock (``mcp.server.sse.SseServerTransport``) uses the SDK's documented endpoint pattern (a
Starlette function endpoint around ``connect_sse`` that returns ``Response()``); ours
(``mcp_sse_transport.SseServerTransport``) a raw ASGI endpoint, as its docs recommend, served by the
library's ``H11Protocol`` (uvicorn's h11 protocol plus the connection-abort hook). Nothing else
differs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import mcp_types as types
import uvicorn
from mcp.server.lowlevel.server import Server
from mcp.shared.message import SessionMessage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

IMPLS = ("stock", "ours")
_CLOSED = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


def make_message(size: int) -> types.JSONRPCNotification:
    """A JSON-RPC notification whose serialized form (the SSE ``data:``) is exactly ``size`` bytes."""
    base = types.JSONRPCNotification(jsonrpc="2.0", method="bench/tick", params={"d": ""})
    overhead = len(base.model_dump_json(by_alias=True, exclude_unset=True))
    if size < overhead:
        raise ValueError(f"payload size must be >= {overhead} bytes")
    message = types.JSONRPCNotification(jsonrpc="2.0", method="bench/tick", params={"d": "x" * (size - overhead)})
    assert len(message.model_dump_json(by_alias=True, exclude_unset=True)) == size
    return message


class _ProgressWriter:
    """A write stream for :class:`Flood` and :class:`Replays` inside a tool call: each ``send``
    is one progress notification on the call's own stream (its ``message`` padded so that the
    notification is about ``size`` bytes); the item passed in is ignored."""

    def __init__(self, ctx: Any, token: str | int, size: int) -> None:
        self.ctx = ctx
        self.token = token
        self.pad = "x" * max(0, size - 110)  # the rest of a progress notification's JSON
        self.sent = 0

    async def send(self, item: Any) -> None:
        self.sent += 1
        await self.ctx.session.send_progress_notification(
            self.token, self.sent, None, message=self.pad, related_request_id=self.ctx.request_id
        )


def make_lowlevel_server(flood: Flood | None = None, replays: Replays | None = None) -> Server[Any]:
    """The full-stack server: one tool, ``progress``, that sends ``count`` progress notifications
    (``interval`` seconds apart, 0 by default: as fast as they go). With ``flood`` and
    ``replays`` (the Streamable HTTP app) two more, on the call's own response stream: ``flood``
    (``tag``, ``size``, ``cap``: :class:`Flood`'s producer as progress notifications) and
    ``replay`` (``tag``, ``n``, ``size``: :class:`Replays`'s, one notification, then ``n`` more
    once ``/replay/go`` says so); each answers once its producer is done."""

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        properties = {"count": {"type": "integer"}, "interval": {"type": "number"}}
        schema = {"type": "object", "properties": properties, "required": ["count"]}
        tools = [types.Tool(name="progress", input_schema=schema)]
        for name in ("flood", "replay"):
            tools.append(types.Tool(name=name, input_schema={"type": "object", "properties": {}}))
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        args = params.arguments or {}
        token = (ctx.meta or {}).get("progress_token")
        if params.name == "flood" and flood is not None and token is not None:
            writer = _ProgressWriter(ctx, token, int(args.get("size", 1024)))
            await flood.run(str(args["tag"]), writer, 200, int(args.get("max", 10_000_000)), float(args.get("cap", 30)))
            return types.CallToolResult(content=[types.TextContent(type="text", text=f"sent {writer.sent}")])
        if params.name == "replay" and replays is not None and token is not None:
            writer = _ProgressWriter(ctx, token, int(args.get("size", 200)))
            await replays.run(str(args["tag"]), writer, int(args["n"]), 200, float(args.get("wait", 60)))
            return types.CallToolResult(content=[types.TextContent(type="text", text=f"sent {writer.sent}")])
        count = int(args.get("count", 0))
        interval = float(args.get("interval", 0))
        if token is not None:
            for i in range(1, count + 1):
                await ctx.session.send_progress_notification(token, i, count, related_request_id=ctx.request_id)
                if interval:
                    await anyio.sleep(interval)
        return types.CallToolResult(content=[types.TextContent(type="text", text=f"sent {count}")])

    return Server("bench", on_list_tools=list_tools, on_call_tool=call_tool)


class Flood:
    """Progress of each ``/flood`` producer, by the client's tag."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}

    async def run(self, tag: str, write: Any, size: int, max_events: int, cap: float) -> None:
        message = make_message(size)
        state: dict[str, Any] = {
            "opened": time.monotonic(),
            "sent": 0,
            "last_ok": None,
            "pending_since": None,
            "released": None,
            "release_send_wait": None,
            "error": None,
            "max_send_wait": 0.0,  # the longest single send, and when it returned or failed
            "max_send_wait_at": None,
        }
        self.runs[tag] = state
        deadline = state["opened"] + cap
        try:
            while state["sent"] < max_events and time.monotonic() < deadline:
                state["pending_since"] = time.monotonic()
                with anyio.fail_after(max(0.0, deadline - time.monotonic()) + 0.001):
                    await write.send(SessionMessage(message))
                now = time.monotonic()
                if now - state["pending_since"] > state["max_send_wait"]:
                    state["max_send_wait"], state["max_send_wait_at"] = now - state["pending_since"], now
                state["pending_since"] = None
                state["sent"] += 1
                state["last_ok"] = now
        except BaseException as exc:
            now = time.monotonic()
            state["released"] = now
            if state["pending_since"] is not None:
                state["release_send_wait"] = now - state["pending_since"]
                if state["release_send_wait"] > state["max_send_wait"]:
                    state["max_send_wait"], state["max_send_wait_at"] = state["release_send_wait"], now
            state["error"] = type(exc).__name__
            if not isinstance(exc, (*_CLOSED, TimeoutError)):
                raise

    def stats(self, tag: str) -> dict[str, Any]:
        state = self.runs.get(tag)
        if state is None:
            return {"found": False}
        now = time.monotonic()

        def rel(t: float | None) -> float | None:
            return None if t is None else t - state["opened"]

        return {
            "found": True,
            "age": now - state["opened"],
            "sent": state["sent"],
            "last_ok": rel(state["last_ok"]),
            "pending_for": None
            if state["pending_since"] is None or state["released"]
            else now - state["pending_since"],
            "released": rel(state["released"]),
            "release_send_wait": state["release_send_wait"],
            "error": state["error"],
            "max_send_wait": state["max_send_wait"],
            "max_send_wait_at": rel(state["max_send_wait_at"]),
        }


@dataclasses.dataclass
class ReplayRun:
    """One ``/replay`` session's producer."""

    n: int
    go: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    sent: int = 0
    seconds: float | None = None
    error: str | None = None


class Replays:
    """The ``/replay`` producers by the client's tag, and the side channel that starts each push
    once its client has gone and tells the client when all N events are in the session."""

    def __init__(self) -> None:
        self.runs: dict[str, ReplayRun] = {}

    async def run(self, tag: str, write: Any, n: int, size: int, time_limit: float) -> None:
        message = make_message(size)
        run = self.runs[tag] = ReplayRun(n)
        try:
            await write.send(SessionMessage(message))  # the one event the client reads before it drops
            with anyio.move_on_after(time_limit):
                await run.go.wait()
            if not run.go.is_set():
                run.error = "no go"
                return
            start = time.perf_counter()
            with anyio.fail_after(time_limit):
                for _ in range(n):
                    await write.send(SessionMessage(message))
                    run.sent += 1
            run.seconds = time.perf_counter() - start
        except (*_CLOSED, TimeoutError) as exc:
            run.error = type(exc).__name__
        finally:
            run.done.set()

    async def go(self, tag: str, attached: Callable[[], bool | None] | None, time_limit: float) -> dict[str, Any]:
        """Wait until the session is detached (``attached()`` False; None: no such session), then
        start the push and wait for it to finish; every wait bounded by ``time_limit``."""
        start = time.perf_counter()
        run = self.runs.get(tag)  # registered before the first event, which the client has read
        if run is None:
            return {"error": f"no /replay session with tag {tag}"}
        state: bool | None = False
        if attached is not None:  # polled: the transport offers no event for a detach
            for _ in range(max(1, round(time_limit / 0.002))):
                state = attached()
                if state is not True:
                    break
                await anyio.sleep(0.002)
        if state is not False:
            return {"error": "the session is gone" if state is None else "the session is still attached"}
        detach_wait = time.perf_counter() - start
        run.go.set()
        with anyio.move_on_after(time_limit):
            await run.done.wait()
        return {
            "n": run.n,
            "sent": run.sent,
            "produce_s": run.seconds,
            "error": run.error if run.done.is_set() else "push not done",
            "detach_wait_s": detach_wait,
        }


def _query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    return dict(parse_qsl(scope.get("query_string", b"").decode()))


Body = Callable[[Scope, Any, Any], Awaitable[None]]
"""What an endpoint does with ``(scope, read_stream, write_stream)`` once the session is open."""


def build_app(
    impl: str,
    grant_timeout: float | None,
    write_timeout: float | None,
    *,
    redis_url: str | None = None,
    redis_prefix: str | None = None,
    owner_lease: float | None = None,
) -> tuple[Starlette, Any]:
    """The app and its transport. With ``redis_url`` (ours only) the transport must be entered
    (``async with``) for as long as the app serves."""
    mcp_server = make_lowlevel_server()
    if impl == "stock":
        if redis_url is not None:
            raise ValueError("--redis-url is for --impl ours")
        from mcp.server.sse import SseServerTransport as StockTransport

        transport: Any = StockTransport("/messages/")
    else:
        from mcp_sse_transport import SseConfig, SseServerTransport

        config = SseConfig()
        if grant_timeout is not None:
            config = dataclasses.replace(config, grant_timeout=grant_timeout)
        if write_timeout is not None:
            config = dataclasses.replace(config, write_timeout=write_timeout)
        if redis_url is None:
            transport = SseServerTransport("/messages/", config=config)
        else:
            config = dataclasses.replace(config, redis_url=redis_url)
            if redis_prefix is not None:
                config = dataclasses.replace(config, redis_prefix=redis_prefix)
            if owner_lease is not None:
                config = dataclasses.replace(config, owner_lease=owner_lease)
            # A worker runs the server of every session it takes over from a worker that died.
            transport = SseServerTransport("/messages/", config=config, server=mcp_server)

    flood = Flood()
    replays = Replays()

    async def push(scope: Scope, read: Any, write: Any) -> None:
        q = _query(scope)
        n, message = int(q["n"]), make_message(int(q["size"]))
        try:
            for _ in range(n):
                await write.send(SessionMessage(message))
            await write.aclose()
        except _CLOSED:
            pass

    async def flood_body(scope: Scope, read: Any, write: Any) -> None:
        q = _query(scope)
        await flood.run(
            q["tag"], write, int(q.get("size", 1024)), int(q.get("max", 10_000_000)), float(q.get("cap", 30))
        )

    async def idle(scope: Scope, read: Any, write: Any) -> None:
        try:
            async for _ in read:  # until the session ends
                pass
        except _CLOSED:
            pass

    async def replay_body(scope: Scope, read: Any, write: Any) -> None:
        if any(name == b"last-event-id" for name, _ in scope["headers"]):
            return  # a resume: ours replays by itself, and this session's producer runs elsewhere
        q = _query(scope)
        await replays.run(q["tag"], write, int(q["n"]), int(q["size"]), float(q.get("wait", 60)))
        await idle(scope, read, write)  # the server keeps the session open, waiting for its client

    def session_attached(session_id: str) -> Callable[[], bool | None] | None:
        statistics = getattr(transport, "statistics", None)  # ours only
        if statistics is None:
            return None

        def attached() -> bool | None:
            for session in statistics().sessions:
                if session_id.startswith(session.session):  # statistics show the first 8 hex digits
                    return bool(session.attached)
            return None

        return attached

    async def full(scope: Scope, read: Any, write: Any) -> None:
        await mcp_server.run(read, write, mcp_server.create_initialization_options())

    def endpoint(body: Body) -> Any:
        if impl == "stock":
            # The SDK's documented pattern (mcp/server/sse.py module docstring).
            async def handle_sse(request: Request) -> Response:
                async with transport.connect_sse(request.scope, request.receive, request._send) as streams:
                    await body(request.scope, streams[0], streams[1])
                return Response()

            return handle_sse

        # Ours: a raw ASGI endpoint (answers once; see mcp_sse_transport.serving._SseEndpoint).
        from mcp_sse_transport import RequestRejected

        class RawEndpoint:
            async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
                try:
                    async with transport.connect_sse(scope, receive, send) as (read, write):
                        await body(scope, read, write)
                except RequestRejected:
                    pass

        return RawEndpoint()

    class Floor:  # a class instance, so Starlette's Route treats it as a raw ASGI app
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            data = f"/messages/?session_id={uuid.uuid4().hex}".encode()
            body = b"event: endpoint\r\ndata: " + data + b"\r\n\r\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(flood.stats(request.query_params.get("tag", "")))

    async def replay_go(request: Request) -> JSONResponse:
        q = request.query_params
        attached = session_attached(q.get("session", ""))
        return JSONResponse(await replays.go(q.get("tag", ""), attached, float(q.get("wait", 30))))

    routes = [
        Route("/push", endpoint=endpoint(push), methods=["GET"]),
        Route("/flood", endpoint=endpoint(flood_body), methods=["GET"]),
        Route("/idle", endpoint=endpoint(idle), methods=["GET"]),
        Route("/replay", endpoint=endpoint(replay_body), methods=["GET"]),
        Route("/replay/go", endpoint=replay_go, methods=["GET"]),
        Route("/sse", endpoint=endpoint(full), methods=["GET"]),
        Route("/floor", endpoint=Floor(), methods=["GET"]),
        Route("/stats", endpoint=stats, methods=["GET"]),
        Mount("/messages/", app=transport.handle_post_message),
    ]
    return Starlette(routes=routes), transport


def _find_stream(manager: Any, session_id: str, stream_id: str) -> Any:
    """Ours: the response stream ``stream_id`` of session ``session_id`` (its event ids name
    both), read from the manager's internals, for the bench only; ``None`` if there is none."""
    hosted = getattr(manager, "_sessions", {}).get(session_id)
    return None if hosted is None else hosted.streams.find(stream_id)


def build_streamable_app(
    impl: str, grant_timeout: float | None, write_timeout: float | None
) -> tuple[Starlette, contextlib.AbstractAsyncContextManager[Any]]:
    """The Streamable HTTP app: the session manager (stock's, or ours with ``SseConfig``) at
    ``/mcp`` serving the lowlevel ``Server`` with its ``flood`` and ``replay`` tools, ``/stats``
    and ``/replay/go`` as in the SSE app; and the manager's ``run()``, to enter while serving.
    Both managers get the same arguments (no event store, no security settings)."""
    flood = Flood()
    replays = Replays()
    mcp_server = make_lowlevel_server(flood, replays)
    manager: Any
    if impl == "stock":
        from mcp.server.streamable_http_manager import StreamableHTTPSessionManager as StockManager

        manager = StockManager(mcp_server)
    else:
        from mcp_sse_transport import SseConfig, StreamableHTTPSessionManager

        config = SseConfig()
        if grant_timeout is not None:
            config = dataclasses.replace(config, grant_timeout=grant_timeout)
        if write_timeout is not None:
            config = dataclasses.replace(config, write_timeout=write_timeout)
        manager = StreamableHTTPSessionManager(mcp_server, config=config)

    class Endpoint:  # a class instance, so Starlette's Route treats it as a raw ASGI app
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await manager.handle_request(scope, receive, send)

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(flood.stats(request.query_params.get("tag", "")))

    async def replay_go(request: Request) -> JSONResponse:
        q = request.query_params
        attached: Callable[[], bool | None] | None = None
        if impl == "ours":
            session_id, stream_id = q.get("session", ""), q.get("stream", "")

            def attached() -> bool | None:
                stream = _find_stream(manager, session_id, stream_id)
                return None if stream is None else bool(stream.attached)

        return JSONResponse(await replays.go(q.get("tag", ""), attached, float(q.get("wait", 30))))

    routes = [
        Route("/mcp", endpoint=Endpoint(), methods=["GET", "POST", "DELETE"]),
        Route("/stats", endpoint=stats, methods=["GET"]),
        Route("/replay/go", endpoint=replay_go, methods=["GET"]),
    ]
    return Starlette(routes=routes), manager.run()


def raise_fd_limit(wanted: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument(
        "--transport",
        choices=("sse", "streamable"),
        default="sse",
        help="sse: the legacy SSE app (default); streamable: the Streamable HTTP session manager at /mcp",
    )
    parser.add_argument("--grant-timeout", type=float, default=None, help="ours: SseConfig.grant_timeout")
    parser.add_argument("--write-timeout", type=float, default=None, help="ours: SseConfig.write_timeout")
    parser.add_argument("--redis-url", default=None, help="ours: SseConfig.redis_url (scale-out on this Redis)")
    parser.add_argument("--redis-prefix", default=None, help="ours, with --redis-url: SseConfig.redis_prefix")
    parser.add_argument("--owner-lease", type=float, default=None, help="ours, with --redis-url: SseConfig.owner_lease")
    parser.add_argument("--profile", default=None, help="write a pyinstrument profile of the whole run here")
    args = parser.parse_args(argv)

    raise_fd_limit()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    preload = os.environ.get("BENCH_SERVER_PRELOAD")
    if preload:  # a developer's experiment (e.g. a monkeypatch of the library) to A/B against
        import runpy

        runpy.run_path(preload, run_name="bench_preload")
    running: contextlib.AbstractAsyncContextManager[Any] | None = None
    if args.transport == "streamable":
        if args.redis_url is not None:
            parser.error("--redis-url is for --transport sse")
        app, running = build_streamable_app(args.impl, args.grant_timeout, args.write_timeout)
    else:
        app, transport = build_app(
            args.impl,
            args.grant_timeout,
            args.write_timeout,
            redis_url=args.redis_url,
            redis_prefix=args.redis_prefix,
            owner_lease=args.owner_lease,
        )

    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # accepted sockets inherit the listener's. With socket.socket(AF_INET, SOCK_STREAM) (proto 0)
    # every connection runs with Nagle on, and a 202 written as head + body waits ~40 ms for the
    # client's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    if args.impl == "ours":
        from mcp_sse_transport import H11Protocol

        http: Any = H11Protocol
    else:
        http = "h11"
    config = uvicorn.Config(
        app,
        http=http,
        loop="asyncio",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=4096,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)

    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")
        profiler.start()

    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default disposition that
    # would kill the process before the profile is written.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)

    async def serve() -> None:
        async with contextlib.AsyncExitStack() as stack:
            if args.redis_url is not None:
                await stack.enter_async_context(transport)  # joins the cluster; hands sessions off on exit
            if running is not None:
                await stack.enter_async_context(running)  # the session manager's run()
            print(f"READY {sock.getsockname()[1]} {os.getpid()}", flush=True)
            await server.serve(sockets=[sock])

    try:
        anyio.run(serve)
    finally:
        if profiler is not None:
            profiler.stop()
            with open(args.profile + ".txt", "w") as f:
                f.write(profiler.output_text(unicode=True, color=False, show_all=False))
            with open(args.profile + ".html", "w") as f:
                f.write(profiler.output_html())
            # The raw session, so the report can be re-rendered (e.g. with other filters).
            profiler.last_session.save(args.profile + ".pyisession")  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
