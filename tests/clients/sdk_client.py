"""The Python SDK's own client, of whichever major this interpreter has, against one server:
``python tests/clients/sdk_client.py URL [--streamable]``. It lists the tools, calls ``echo``,
``countdown`` (collecting its progress) and ``fail``, and prints one JSON report on stdout."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from typing import Any

import anyio

MAJOR = int(version("mcp").split(".")[0])


async def _session_report(session: Any) -> dict[str, Any]:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    tools = await session.list_tools()
    echo = await session.call_tool("echo", {"text": "hi"})
    counted = await session.call_tool("countdown", {"steps": 3, "interval": 0.05}, progress_callback=on_progress)
    failed = await session.call_tool("fail", {"reason": "boom"})
    return {
        "mcp": version("mcp"),
        "tools": sorted(tool.name for tool in tools.tools),
        "echo": echo.content[0].text,
        "countdown": counted.content[0].text,
        "progress": progress,
        "fail": {
            "isError": bool(getattr(failed, "is_error", getattr(failed, "isError", False))),
            "text": failed.content[0].text,
        },
    }


async def main(url: str, streamable: bool) -> dict[str, Any]:
    with anyio.fail_after(30):
        if MAJOR >= 2:
            from mcp.client.client import Client
            from mcp.client.sse import sse_client
            from mcp.client.streamable_http import streamable_http_client

            transport = streamable_http_client(url) if streamable else sse_client(url)
            async with Client(transport, mode="legacy") as client:
                return await _session_report(client)
        from mcp.client.session import ClientSession
        from mcp.client.sse import sse_client as sse_client_v1
        from mcp.client.streamable_http import streamablehttp_client  # type: ignore[attr-defined]  # 1.x spelling

        if streamable:
            async with streamablehttp_client(url) as (read, write, _):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    return await _session_report(session)
        async with sse_client_v1(url) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await _session_report(session)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--streamable", action="store_true")
    args = parser.parse_args()
    print(json.dumps(anyio.run(main, args.url, args.streamable)))
