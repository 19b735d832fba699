"""The Python SDK's own client, of whichever major this interpreter has, against one server:
``python -m tests.clients.sdk_client URL [--streamable]`` (from the checkout: the session is the
example client's). It lists the tools, calls ``echo``,
``countdown`` (collecting its progress) and ``fail``, and prints one JSON report on stdout."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import version
from typing import Any

import anyio

from examples.client import session


async def _session_report(client: Any) -> dict[str, Any]:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    tools = await client.list_tools()
    echo = await client.call_tool("echo", {"text": "hi"})
    counted = await client.call_tool("countdown", {"steps": 3, "interval": 0.05}, progress_callback=on_progress)
    failed = await client.call_tool("fail", {"reason": "boom"})
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
        async with session("streamable" if streamable else "stock", url) as client:
            return await _session_report(client)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--streamable", action="store_true")
    args = parser.parse_args()
    print(json.dumps(anyio.run(main, args.url, args.streamable)))
