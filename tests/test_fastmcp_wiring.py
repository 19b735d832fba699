"""A ``fastmcp.FastMCP`` served by ``sse_app`` is wired as fastmcp's own SSE app wires it
(``_sdk/_fastmcp``): its lifespan is entered once for the app (fastmcp 3 fails every session of a
server with a lifespan otherwise), its custom routes are served, its auth provider guards our
endpoints (401 with its challenge; the token reaches the tool), and its request-context
middleware tells tools the transport. Over a real uvicorn, with the SDK's client.

Marked ``framework`` and run where fastmcp is installed (``.ci/matrix``'s fastmcp3 and
fastmcp4 jobs); elsewhere it is skipped, as fastmcp is not there to serve.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from mcp_sse_transport import SseConfig, sse_app, streamable_http_app

from ._sdk_compat import Client, sse_client, streamable_http_client, types
from ._sdk_compat import httpx as httpx2
from ._support import serving

try:
    import fastmcp
    from fastmcp import Context
    from fastmcp.server.auth import RemoteAuthProvider
    from fastmcp.server.auth.providers.jwt import StaticTokenVerifier
    from fastmcp.server.dependencies import get_access_token
except ImportError:  # not installed here: the tests are skipped (deselected by default anyway)
    fastmcp = None

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.framework,
    pytest.mark.skipif(fastmcp is None, reason="fastmcp is not installed here (.ci/matrix's fastmcp jobs have it)"),
]

TOKEN = "secret-token"


def _server(*, auth: bool) -> Any:
    entered: list[str] = []

    @asynccontextmanager
    async def lifespan(server: Any) -> AsyncIterator[dict[str, str]]:
        entered.append("in")
        yield {"state": "ready"}

    provider = None
    if auth:
        verifier = StaticTokenVerifier({TOKEN: {"client_id": "the-client", "scopes": ["tools"]}})
        provider = RemoteAuthProvider(verifier, ["https://auth.example.com"], base_url="http://127.0.0.1")
    mcp = fastmcp.FastMCP("wired", lifespan=lifespan, auth=provider)

    @mcp.tool  # type: ignore[untyped-decorator]  # fastmcp is not installed where mypy runs
    def state(ctx: Context) -> str:
        """The lifespan's state, the transport fastmcp sees, and the caller's client id."""
        token = get_access_token()
        return f"{ctx.lifespan_context['state']} {ctx.transport} {token.client_id if token else '-'}"

    @mcp.custom_route("/health", methods=["GET"])  # type: ignore[untyped-decorator]
    async def health(request: Any) -> Any:
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("ok")

    mcp.entered = entered
    return mcp


def _text(result: Any) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def test_the_lifespan_is_entered_once_and_custom_routes_are_served() -> None:
    mcp = _server(auth=False)
    with anyio.fail_after(30):
        # session_grace=0: each session ends with its connection, so the two never overlap
        async with serving(sse_app(mcp, config=SseConfig(session_grace=0))) as base:
            async with httpx2.AsyncClient(base_url=base) as http:
                health = await http.get("/health")
            for _ in range(2):  # two sessions, one after the other; one lifespan
                async with Client(sse_client(f"{base}/sse"), mode="legacy") as client:
                    answer = _text(await client.call_tool("state", {}))
    assert health.status_code == 200 and health.text == "ok"
    assert answer == "ready sse -"
    assert mcp.entered == ["in"]


async def test_the_auth_provider_guards_our_endpoints_and_the_token_reaches_the_tool() -> None:
    mcp = _server(auth=True)
    app = sse_app(mcp)
    # what fastmcp's own routes read (its component manager guards itself with fastmcp_auth)
    assert (app.state.fastmcp_server, app.state.fastmcp_auth, app.state.path) == (mcp, mcp.auth, "/sse")
    with anyio.fail_after(30):
        async with serving(app) as base:
            async with httpx2.AsyncClient(base_url=base) as http:
                refused = await http.get("/sse")
                metadata = await http.get("/.well-known/oauth-protected-resource/sse")
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with Client(sse_client(f"{base}/sse", headers=headers), mode="legacy") as client:
                answer = _text(await client.call_tool("state", {}))
    assert refused.status_code == 401
    assert "resource_metadata=" in refused.headers["www-authenticate"]
    assert metadata.status_code == 200 and metadata.json()["resource"].endswith("/sse")
    assert answer == "ready sse the-client"


async def test_streamable_http_names_its_own_transport() -> None:
    mcp = _server(auth=False)
    with anyio.fail_after(30):
        async with serving(streamable_http_app(mcp)) as base:
            async with Client(streamable_http_client(f"{base}/mcp"), mode="legacy") as client:
                answer = _text(await client.call_tool("state", {}))
    assert answer == "ready streamable-http -"
