"""Call the example server's tools with the SDK client: ``python -m examples.client [URL] [--stock]``.

By default the client transport is this library's resuming one; ``--stock`` uses the SDK's own
``sse_client``, which works against the server unchanged.
"""

from __future__ import annotations

import argparse

import anyio
from mcp.client.client import Client
from mcp.client.sse import sse_client
from mcp_types import TextContent

from mcp_sse_transport.client import resumable_sse_client


async def main(url: str, stock: bool) -> None:
    transport = sse_client(url) if stock else resumable_sse_client(url)
    async with Client(transport, mode="legacy") as client:
        tools = await client.list_tools()
        print("tools:", ", ".join(tool.name for tool in tools.tools))

        result = await client.call_tool("echo", {"text": "hello over SSE"})
        print("echo:", [c.text for c in result.content if isinstance(c, TextContent)])

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            print(f"  progress {progress:g}/{total:g}: {message}")

        result = await client.call_tool("countdown", {"steps": 3}, progress_callback=on_progress)
        print("countdown:", [c.text for c in result.content if isinstance(c, TextContent)])

        result = await client.call_tool("fail", {})
        print("fail: is_error =", result.is_error)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8000/sse")
    parser.add_argument("--stock", action="store_true", help="use the SDK's sse_client")
    args = parser.parse_args()
    anyio.run(main, args.url, args.stock)
