"""An MCP tool server on mcp-sse-transport: ``python -m examples.server [--host H] [--port P]``.

It runs on either SDK major (mcp 2.x's ``MCPServer``, or 1.x's ``FastMCP``). It serves both
transports: legacy HTTP+SSE at ``/sse`` (and ``/messages/``) and Streamable HTTP
at ``/mcp``. With ``--redis-url redis://127.0.0.1:6379/0``, run as many of these as you like, on
their own ports, behind any load balancer: they share SSE sessions through Redis (the README's
deployment section); Streamable HTTP sessions stay in one process, so it serves ``/sse`` only.

Tools: ``echo`` returns its text, ``countdown`` streams progress notifications then returns,
``fail`` raises a ``ToolError``, so a client sees a tool error (the server logs it as one INFO
line, as the SDK does for a failure a tool anticipated; a crash would log its traceback). GET
``/sse`` opens a session; ``/`` is a page whose browser ``EventSource`` talks to the tools and
resumes after a dropped connection.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse

from mcp_sse_transport import SseConfig, Transport, run, sse_app, streamable_http_app

try:  # mcp 2.x
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # mcp 1.x: the same server, as its FastMCP (examples/frameworks/sdk1_server.py)
    from mcp.server.fastmcp import Context  # type: ignore[attr-defined,no-redef,unused-ignore]
    from mcp.server.fastmcp import FastMCP as MCPServer  # type: ignore[attr-defined,no-redef,unused-ignore]
    from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[import-not-found,no-redef,unused-ignore]

mcp = MCPServer("mcp-sse-transport example")
PAGE = Path(__file__).parent / "static" / "index.html"


@mcp.custom_route("/", methods=["GET"])  # type: ignore[untyped-decorator]  # the SDK leaves it untyped
async def page(request: Request) -> FileResponse:
    """The browser demo."""
    return FileResponse(PAGE)


@mcp.tool()
def echo(text: str) -> str:
    """Return ``text`` unchanged."""
    return text


@mcp.tool()
async def countdown(steps: int, ctx: Context, interval: float = 0.0) -> str:
    """Report ``steps`` progress notifications, ``interval`` seconds apart, then say how many."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, message=f"step {step} of {steps}")
        if interval:
            await anyio.sleep(interval)
    return f"counted {steps} steps"


@mcp.tool()
def fail(reason: str = "this demo tool always fails, as expected") -> str:
    """Fail on purpose, so the client gets a tool error (``is_error``) with ``reason``."""
    # A ToolError is a failure the tool saw coming: the caller gets its message, and the server
    # logs one line without a traceback. Any other exception is a crash, logged with its traceback.
    raise ToolError(reason)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--heartbeat", type=float, default=15.0, help="idle seconds before a heartbeat")
    parser.add_argument("--redis-url", help="share sessions with other workers through this Redis")
    parser.add_argument("--redis-prefix", default="mcp-sse:", help="prefix of this deployment's Redis keys")
    parser.add_argument("--owner-lease", type=float, default=5.0, help="seconds before a dead worker's sessions move")
    parser.add_argument("--retry", type=float, default=3.0, help="seconds clients wait before reconnecting")
    parser.add_argument("--max-sessions", type=int, default=10_000, help="sessions this worker serves at most")
    return parser.parse_args(argv)


def _config(args: argparse.Namespace) -> SseConfig:
    return SseConfig(
        heartbeat_interval=args.heartbeat,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        owner_lease=args.owner_lease,
        retry_interval=args.retry,
        max_sessions=args.max_sessions,
    )


def _transport(args: argparse.Namespace) -> Transport:
    """Both transports; SSE alone with Redis (Streamable HTTP sessions live in one process)."""
    return "sse" if args.redis_url else "both"


def app() -> Starlette:
    """The app for uvicorn's own command line, options from ``$EXAMPLE_SERVER_ARGS``:
    ``EXAMPLE_SERVER_ARGS="--redis-url redis://127.0.0.1:6379/0" uvicorn examples.server:app
    --factory --workers 3 --http mcp_sse_transport.serving:H11Protocol``. Without ``--redis-url``
    it is the Streamable HTTP app (``/mcp``) of one worker."""
    args = _arguments(shlex.split(os.environ.get("EXAMPLE_SERVER_ARGS", "")))
    if _transport(args) == "sse":
        return sse_app(mcp, config=_config(args))
    return streamable_http_app(mcp, config=_config(args))


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(mcp, host=args.host, port=args.port, config=_config(args), transport=_transport(args))


if __name__ == "__main__":
    main()
