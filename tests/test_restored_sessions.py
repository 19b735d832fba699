"""Reconnects that cannot resume still land in a working session.

The TypeScript SDK's ``SSEClientTransport`` reconnects (through EventSource) without
``Last-Event-ID``, since its custom fetch replaces the request headers, but with the
``MCP-Protocol-Version`` header that only an initialized client sends. Its new session's server
gets that client's handshake replayed before the first message, unless the client opens with
``initialize`` itself. Raw HTTP here, since no Python client sends that header on a GET; the
real client is in ``test_outside_clients.py``.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from mcp_sse_transport import sse_app

from ._sdk_compat import Server, ServerRequestContext, types
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, SseEvent, serving
from .test_integration import OPEN
from .test_scaleout import two_workers

pytestmark = pytest.mark.anyio


async def _list_tools(ctx: ServerRequestContext, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    return types.ListToolsResult(tools=[types.Tool(name="whoami", input_schema={"type": "object"})])


async def _call_tool(ctx: ServerRequestContext, params: types.CallToolRequestParams) -> types.CallToolResult:
    """What the server knows of its client."""
    client = ctx.session.client_params
    assert client is not None, "initialized: the server knows a client"
    seen = {
        "client": client.client_info.name,
        "protocol": ctx.session.protocol_version,
        "capabilities": client.capabilities.model_dump(by_alias=True, exclude_none=True),
        "arguments": params.arguments,
    }
    return types.CallToolResult(content=[types.TextContent(type="text", text=json.dumps(seen))])


def whoami_server() -> Server[Any]:
    return Server("restore", on_list_tools=_list_tools, on_call_tool=_call_tool)


def whoami(request_id: int, **arguments: Any) -> dict[str, Any]:
    params = {"name": "whoami", "arguments": arguments}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def seen_by_the_server(event: SseEvent | None) -> dict[str, Any]:
    assert event is not None and event.event == "message"
    result = event.json()["result"]
    assert not result.get("isError"), result
    seen: dict[str, Any] = json.loads(result["content"][0]["text"])
    return seen


async def _endpoint(raw: RawSseStream) -> str:
    endpoint = await raw.next_event()
    assert endpoint is not None and endpoint.event == "endpoint"
    return endpoint.data


async def test_a_reconnect_with_only_the_protocol_version_lands_in_an_initialized_session() -> None:
    with anyio.fail_after(20):
        async with serving(sse_app(whoami_server(), transport_security=OPEN)) as base:
            async with (
                RawSseStream.open(base, headers={"MCP-Protocol-Version": "2025-03-26"}) as raw,
                httpx2.AsyncClient(base_url=base) as http,
            ):
                post_url = await _endpoint(raw)
                listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
                assert (await http.post(post_url, json=listing)).status_code == 202
                # The first event is this answer: the replayed initialize's was swallowed.
                tools = await raw.next_event()
                assert tools is not None and tools.json() == {
                    "jsonrpc": "2.0",
                    "id": 1,
                    "result": {"tools": [{"name": "whoami", "inputSchema": {"type": "object"}}]},
                }
                assert (await http.post(post_url, json=whoami(2))).status_code == 202
                seen = seen_by_the_server(await raw.next_event())
    assert seen == {
        "client": "mcp-sse-transport-restored-session",
        "protocol": "2025-03-26",
        "capabilities": {},
        "arguments": {},
    }


async def test_a_client_that_initializes_on_it_anyway_gets_its_own_handshake() -> None:
    with anyio.fail_after(20):
        async with serving(sse_app(whoami_server(), transport_security=OPEN)) as base:
            async with (
                RawSseStream.open(base, headers={"MCP-Protocol-Version": "2025-11-25"}) as raw,
                httpx2.AsyncClient(base_url=base) as http,
            ):
                post_url = await _endpoint(raw)
                init = {
                    "jsonrpc": "2.0",
                    "id": 0,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {"roots": {"listChanged": True}},
                        "clientInfo": {"name": "raw", "version": "1"},
                    },
                }
                assert (await http.post(post_url, json=init)).status_code == 202
                answer = await raw.next_event()
                assert answer is not None and answer.json()["id"] == 0
                assert answer.json()["result"]["protocolVersion"] == "2025-06-18"
                initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                assert (await http.post(post_url, json=initialized)).status_code == 202
                assert (await http.post(post_url, json=whoami(1))).status_code == 202
                seen = seen_by_the_server(await raw.next_event())
    assert seen["client"] == "raw", "the client's own handshake, nothing replayed before it"
    assert seen["protocol"] == "2025-06-18"
    assert seen["capabilities"] == {"roots": {"listChanged": True}}


async def test_concurrent_first_posts_all_reach_an_initialized_server() -> None:
    calls = 8
    with anyio.fail_after(20):
        async with serving(sse_app(whoami_server(), transport_security=OPEN)) as base:
            async with (
                RawSseStream.open(base, headers={"MCP-Protocol-Version": "2025-06-18"}) as raw,
                httpx2.AsyncClient(base_url=base) as http,
            ):
                post_url = await _endpoint(raw)
                statuses: list[int] = []

                async def post(n: int) -> None:
                    statuses.append((await http.post(post_url, json=whoami(n, n=n))).status_code)

                async with anyio.create_task_group() as tg:
                    for n in range(calls):
                        tg.start_soon(post, n)
                answered = [seen_by_the_server(await raw.next_event())["arguments"]["n"] for _ in range(calls)]
    assert statuses == [202] * calls
    assert sorted(answered) == list(range(calls))


@pytest.mark.parametrize("header", [None, "2026-07-28", "1999-01-01"])
async def test_without_a_version_the_sdk_handshakes_with_a_session_starts_uninitialized(header: str | None) -> None:
    """No header (a first connect), or a version that has no ``initialize`` handshake: an ordinary
    new session, whose server refuses calls before the client initializes."""
    headers = {"MCP-Protocol-Version": header} if header is not None else None
    with anyio.fail_after(20):
        async with serving(sse_app(whoami_server(), transport_security=OPEN)) as base:
            async with RawSseStream.open(base, headers=headers) as raw, httpx2.AsyncClient(base_url=base) as http:
                post_url = await _endpoint(raw)
                assert (await http.post(post_url, json=whoami(1))).status_code == 202
                refused = await raw.next_event()
                assert refused is not None and refused.json()["id"] == 1
                assert refused.json()["error"]["code"] == types.INVALID_PARAMS


async def test_a_restored_handshake_is_stored_for_a_worker_taking_the_session_over(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    with anyio.fail_after(30):
        async with two_workers(redis_url, redis_prefix) as (a, b):
            async with (
                RawSseStream.open(a, headers={"MCP-Protocol-Version": "2025-06-18"}) as raw,
                httpx2.AsyncClient(base_url=b) as http,
            ):
                post_url = await _endpoint(raw)
                # Through the other worker: handed to the owner, which replays the handshake.
                listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
                assert (await http.post(post_url, json=listing)).status_code == 202
                answer = await raw.next_event()
                assert answer is not None and answer.json()["id"] == 1 and "error" not in answer.json()
                session_id = post_url.split("session_id=")[1]
                meta = await redis_client.hgetall(f"{redis_prefix}{{{session_id}}}:meta")
    init = json.loads(meta[b"init"])
    assert init["method"] == "initialize"
    assert init["params"]["protocolVersion"] == "2025-06-18"
    assert init["params"]["clientInfo"]["name"] == "mcp-sse-transport-restored-session"
    assert json.loads(meta[b"initialized"]) == {"jsonrpc": "2.0", "method": "notifications/initialized"}
