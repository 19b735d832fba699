"""langchain-mcp-adapters' ``MultiServerMCPClient`` (transport ``sse``) against one server:
``python tests/clients/langchain_client.py SSE_URL``. It loads the tools, invokes ``echo``,
``countdown`` (collecting its progress through the adapter's callbacks) and ``fail``, and prints
one JSON report on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from langchain_mcp_adapters.callbacks import Callbacks
from langchain_mcp_adapters.client import MultiServerMCPClient


async def main(url: str) -> dict[str, Any]:
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None, context: Any) -> None:
        progress.append(value)

    client = MultiServerMCPClient(
        {"server": {"transport": "sse", "url": url}}, callbacks=Callbacks(on_progress=on_progress)
    )
    with anyio.fail_after(30):
        tools = {tool.name: tool for tool in await client.get_tools()}
        echo = await tools["echo"].ainvoke({"text": "hi"})
        counted = await tools["countdown"].ainvoke({"steps": 3, "interval": 0.05})
        try:
            failed: dict[str, Any] = {"raised": False, "text": _text(await tools["fail"].ainvoke({"reason": "boom"}))}
        except Exception as exc:  # an adapter that raises ToolException for a tool error
            failed = {"raised": True, "type": type(exc).__name__, "text": str(exc)}
    return {
        "tools": sorted(tools),
        "echo": _text(echo),
        "countdown": _text(counted),
        "progress": progress,
        "fail": failed,
    }


def _text(result: Any) -> str:
    """A tool's text, as the adapter returns it (a string, or content blocks)."""
    if isinstance(result, str):
        return result
    return "".join(block["text"] if isinstance(block, dict) else str(block) for block in result)


if __name__ == "__main__":
    print(json.dumps(anyio.run(main, sys.argv[1])))
