"""Clients of the README's table that no other module runs through a cut stream: the Python
SDK's stock ``sse_client``, and the TypeScript SDK's ``SSEClientTransport`` (npm
``@modelcontextprotocol/sdk``, pinned in ``tests/ts/package.json``), each through a proxy that
cuts its stream mid-call.

The stock client does not reconnect: the call in flight and every later one fail with
"Connection closed" (-32000), at once.

The TypeScript client's EventSource reconnects by itself, but without ``Last-Event-ID`` (the
SDK's custom fetch replaces the request headers) and with ``MCP-Protocol-Version``: it cannot
resume, and lands in a new session whose handshake the server restores, so its next call
succeeds. The call that was in flight is answered into the old session, which the client never
comes back to: the client sees it time out (``RequestTimeout``, -32001, after the call's
timeout; 60 s by default).

The SDK is installed here, with ``npm ci`` into ``tests/ts/node_modules`` (gitignored) when that
does not hold the pinned version; missing node or npm fails the test, it is never skipped.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_sse_transport import SseConfig, SseServerTransport, sse_app

from ._sdk_compat import Client, MCPError, Server, ServerRequestContext, needs_mcp2, sse_client, types
from ._support import CuttingProxy, serving
from .test_integration import OPEN

pytestmark = pytest.mark.anyio

TS_DIR = Path(__file__).resolve().parent / "ts"
SDK = "@modelcontextprotocol/sdk"
INSTALL_TIMEOUT = 300.0
INFLIGHT_TIMEOUT_MS = 3000
"""The in-flight call's timeout on the client (the SDK's default is 60 s)."""


def pinned_sdk_version() -> str:
    version: str = json.loads((TS_DIR / "package.json").read_text())["dependencies"][SDK]
    return version


def _installed_sdk_version() -> str | None:
    manifest = TS_DIR / "node_modules" / SDK / "package.json"
    if not manifest.is_file():
        return None
    version: str = json.loads(manifest.read_text())["version"]
    return version


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the pinned SDK installed beside the test script."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are required for the TypeScript SDK test (Debian: apt-get install nodejs npm)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    if int(version.strip().lstrip("v").split(".")[0]) < 18:
        pytest.fail(f"the TypeScript SDK needs node >= 18, found {version.strip()}")
    # One install at a time, should two runs share this checkout.
    with open(Path(tempfile.gettempdir()) / "mcp-sse-transport-ts-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_sdk_version() != pinned_sdk_version():
            installed = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=TS_DIR,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
            )
            if installed.returncode != 0:
                pytest.fail(f"npm ci failed in {TS_DIR}:\n{installed.stdout}\n{installed.stderr}")
        assert _installed_sdk_version() == pinned_sdk_version()
    return node


class _Tools:
    """``echo``, and ``slow``, which runs until the test releases it."""

    def __init__(self) -> None:
        self.slow_entered = anyio.Event()
        self.release = anyio.Event()

    async def list_tools(
        self, ctx: ServerRequestContext, params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        schema: dict[str, Any] = {"type": "object"}
        return types.ListToolsResult(tools=[types.Tool(name=name, input_schema=schema) for name in ("echo", "slow")])

    async def call_tool(self, ctx: ServerRequestContext, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name == "slow":
            self.slow_entered.set()
            await self.release.wait()
            text = "slow done"
        else:
            text = str((params.arguments or {}).get("text", ""))
        return types.CallToolResult(content=[types.TextContent(type="text", text=text)])


class _RecordGets:
    """Records the headers of every GET, as the server received them."""

    def __init__(self, app: ASGIApp, gets: list[dict[str, str]]) -> None:
        self.app = app
        self.gets = gets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            self.gets.append({name.decode().lower(): value.decode() for name, value in scope["headers"]})
        await self.app(scope, receive, send)


async def _read_steps(process: anyio.abc.Process, steps: list[dict[str, Any]]) -> None:
    assert process.stdout is not None
    pending = b""
    async for chunk in process.stdout:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        steps.extend(json.loads(line) for line in lines if line.strip())


async def _collect(stream: anyio.abc.ByteReceiveStream | None, into: bytearray) -> None:
    assert stream is not None
    async for chunk in stream:
        into += chunk


async def test_the_typescript_sdk_client_lands_in_a_working_session_after_a_cut_mid_call(node: str) -> None:
    tools = _Tools()
    server = Server("ts-reconnect", on_list_tools=tools.list_tools, on_call_tool=tools.call_tool)
    app = sse_app(server, transport_security=OPEN, config=SseConfig(retry_interval=0.2, drain_timeout=0.5))
    transport: SseServerTransport = app.state.sse_transport
    gets: list[dict[str, str]] = []
    app.add_middleware(_RecordGets, gets=gets)
    steps: list[dict[str, Any]] = []
    stderr = bytearray()
    old_sessions: list[Any] = []

    async def cut_mid_call(proxy: CuttingProxy) -> None:
        await tools.slow_entered.wait()
        ((_, old),) = transport._host.sessions.items()
        old_sessions.append(old)
        proxy.cut()  # the stream drops while the server runs the call
        await old.handler.detached()
        tools.release.set()  # answered now, into the session the client left
        await anyio.wait_all_tasks_blocked()  # the answer went where it goes, before the client is back
        assert old.handler.statistics().buffered_events == 1

    with anyio.fail_after(60):
        async with serving(app) as base:
            proxy = CuttingProxy(base, streams_only=True)
            async with proxy.running() as proxied:
                command = [node, str(TS_DIR / "reconnect.mjs"), f"{proxied}/sse", str(INFLIGHT_TIMEOUT_MS)]
                async with await anyio.open_process(command, cwd=TS_DIR, stderr=subprocess.PIPE) as process:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_read_steps, process, steps)
                        tg.start_soon(_collect, process.stderr, stderr)
                        tg.start_soon(cut_mid_call, proxy)
                        await process.wait()
                        if process.returncode != 0:  # it failed: nothing more will happen
                            tg.cancel_scope.cancel()
                (old,) = old_sessions
                old_stats = old.handler.statistics()
    by_step = {step["step"]: step for step in steps}
    assert process.returncode == 0, (steps, stderr.decode(errors="replace"))
    assert [step["step"] for step in steps] == [
        "connected",
        "before",
        "inflight-sent",
        "reconnected",
        "after",
        "inflight",
        "done",
    ]
    # EventSource reconnected by itself: no Last-Event-ID, the protocol version of an initialized client.
    assert len(gets) == 2 and proxy.cuts == 1
    assert "last-event-id" not in gets[0] and "mcp-protocol-version" not in gets[0]
    assert "last-event-id" not in gets[1], "the SDK's fetch drops the header EventSource sets"
    assert gets[1]["mcp-protocol-version"] == by_step["connected"]["protocol"] == "2025-11-25"
    # A new session, already initialized: the next call succeeds without a handshake.
    assert by_step["reconnected"]["endpoint"] != by_step["connected"]["endpoint"]
    assert by_step["before"]["text"] == "before"
    assert by_step["after"]["text"] == "after"
    # The call in flight: answered into the old session, which the client never resumes; the
    # client times it out.
    assert by_step["inflight"] == {
        "step": "inflight",
        "outcome": "error",
        "name": "McpError",
        "code": -32001,
        "message": "MCP error -32001: Request timed out",
    }
    assert old_stats.buffered_events == 1 and not old_stats.attached


@needs_mcp2(
    "stock client that fails a call after its connection was cut with MCPError CONNECTION_CLOSED "
    "(1.x's ClientSession raises anyio.ClosedResourceError from its closed write stream)"
)
async def test_the_python_sdk_stock_client_does_not_reconnect_after_a_cut_mid_call() -> None:
    tools = _Tools()
    server = Server("stock-cut", on_list_tools=tools.list_tools, on_call_tool=tools.call_tool)
    app = sse_app(server, transport_security=OPEN, config=SseConfig(drain_timeout=0.5))
    failures: list[MCPError] = []
    with anyio.fail_after(30):
        async with serving(app) as base:
            proxy = CuttingProxy(base, streams_only=True)
            async with proxy.running() as proxied:
                async with Client(sse_client(f"{proxied}/sse"), mode="legacy") as client:
                    before = await client.call_tool("echo", {"text": "before"})
                    assert before.content[0] == types.TextContent(type="text", text="before")

                    async def in_flight() -> None:
                        with pytest.raises(MCPError) as caught:
                            await client.call_tool("slow", {})
                        failures.append(caught.value)

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(in_flight)
                        await tools.slow_entered.wait()
                        proxy.cut()
                    with pytest.raises(MCPError) as after:
                        await client.call_tool("echo", {"text": "after"})
                    failures.append(after.value)
                    tools.release.set()
    assert [(failure.error.code, failure.error.message) for failure in failures] == [
        (types.CONNECTION_CLOSED, "Connection closed"),
    ] * 2
    assert proxy.cuts == 1
