"""Call the example server's tools with the SDK client:
``python -m examples.client [--host H] [--port P] [--stock | --streamable]``, or
``python -m examples.client URL``.

``--host`` and ``--port`` are the server's own (``python -m examples.server --port P``); a URL names
the SSE endpoint itself (default ``http://127.0.0.1:8000/sse``). By default the client transport is
this library's resuming one; ``--stock`` uses the SDK's own ``sse_client``, which works against the
server unchanged; ``--streamable`` speaks Streamable HTTP to ``/mcp`` with the SDK's
``streamable_http_client``. It runs on either SDK major (2.x's ``Client``, 1.x's ``ClientSession``).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from mcp.client.sse import sse_client

from mcp_sse_transport.client import resumable_sse_client

try:  # mcp 2.x
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp_types import TextContent

    MAJOR = 2
except ImportError:  # mcp 1.x
    from mcp.client.session import ClientSession  # type: ignore[attr-defined,unused-ignore]
    from mcp.client.streamable_http import streamablehttp_client  # type: ignore[attr-defined,unused-ignore]
    from mcp.types import TextContent  # type: ignore[no-redef,unused-ignore]

    MAJOR = 1


@asynccontextmanager
async def session(kind: str, url: str) -> AsyncIterator[Any]:
    """The SDK's client session over the chosen transport, initialized."""
    if MAJOR >= 2:
        transport: AbstractAsyncContextManager[Any]
        if kind == "streamable":
            transport = streamable_http_client(url)
        else:
            transport = sse_client(url) if kind == "stock" else resumable_sse_client(url)
        async with Client(transport, mode="legacy") as client:
            yield client
        return
    if kind == "streamable":
        async with streamablehttp_client(url) as (read, write, _), ClientSession(read, write) as client:
            await client.initialize()
            yield client
        return
    transport = sse_client(url) if kind == "stock" else resumable_sse_client(url)
    async with transport as (read, write), ClientSession(read, write) as client:
        await client.initialize()
        yield client


async def main(url: str, kind: str) -> None:
    async with session(kind, url) as client:
        tools = await client.list_tools()
        print("tools:", ", ".join(tool.name for tool in tools.tools))

        over = "Streamable HTTP" if kind == "streamable" else "SSE"
        result = await client.call_tool("echo", {"text": f"hello over {over}"})
        print("echo:", [c.text for c in result.content if isinstance(c, TextContent)])

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            print(f"  progress {progress:g}/{total:g}: {message}")

        result = await client.call_tool("countdown", {"steps": 3}, progress_callback=on_progress)
        print("countdown:", [c.text for c in result.content if isinstance(c, TextContent)])

        result = await client.call_tool("fail", {})  # a tool error, on purpose
        is_error = result.is_error if MAJOR >= 2 else result.isError
        print("fail: is_error =", is_error, [c.text for c in result.content if isinstance(c, TextContent)])


def _url(argv: list[str] | None) -> tuple[str, str]:
    """The endpoint's URL and the client kind (``resuming``, ``stock``, ``streamable``), from the
    command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", help="the endpoint (default: http://HOST:PORT/sse, or /mcp)")
    parser.add_argument("--host", help="the server's host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="the server's port (default 8000)")
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument("--stock", action="store_true", help="use the SDK's sse_client")
    kinds.add_argument("--streamable", action="store_true", help="use Streamable HTTP (/mcp)")
    args = parser.parse_args(argv)
    kind = "streamable" if args.streamable else "stock" if args.stock else "resuming"
    if args.url is not None:
        if args.host is not None or args.port is not None:
            parser.error("give either a URL or --host/--port, not both")
        return args.url, kind
    host = args.host or "127.0.0.1"
    if ":" in host and not host.startswith("["):  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{args.port or 8000}/{'mcp' if args.streamable else 'sse'}", kind


if __name__ == "__main__":
    anyio.run(main, *_url(None))
