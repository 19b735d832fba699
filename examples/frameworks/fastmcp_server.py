"""A ``fastmcp.FastMCP`` server (PrefectHQ's fastmcp 3.x on mcp 1.x, or 4.x on mcp 2.x) on
mcp-sse-transport: ``python -m examples.frameworks.fastmcp_server [--port P]``.

Legacy SSE at ``/sse`` with ``/messages/``; Streamable HTTP at ``/mcp``. The same tools as
``examples.server``: ``echo``, ``countdown`` (progress notifications), ``fail`` (a tool error).
"""

from __future__ import annotations

import argparse

import anyio
from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError

from mcp_sse_transport import run

mcp = FastMCP("fastmcp on mcp-sse-transport")


@mcp.tool
def echo(text: str) -> str:
    """Return ``text`` unchanged."""
    return text


@mcp.tool
async def countdown(steps: int, ctx: Context, interval: float = 0.0) -> str:
    """Report ``steps`` progress notifications, ``interval`` seconds apart, then say how many."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, message=f"step {step} of {steps}")
        if interval:
            await anyio.sleep(interval)
    return f"counted {steps} steps"


@mcp.tool
def fail(reason: str = "this demo tool always fails, as expected") -> str:
    """Fail on purpose, so the client gets a tool error with ``reason``."""
    raise ToolError(reason)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    run(mcp, host=args.host, port=args.port, transport="both")  # the one line


if __name__ == "__main__":
    main()
