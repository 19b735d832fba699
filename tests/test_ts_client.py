"""The TypeScript SDK's ``SSEClientTransport`` (npm ``@modelcontextprotocol/sdk``, pinned in
``tests/ts/package.json``) against the example server as its own process: it lists the tools,
calls one, receives progress notifications during a call, and sees a tool error. Node and the
pinned SDK come from ``test_outside_clients``'s fixture (``npm ci``; no node fails the test)."""

from __future__ import annotations

import json
import sys

import anyio
import pytest

from ._cluster import _processes
from ._sdk_compat import EXAMPLE_MODULE
from .test_outside_clients import TS_DIR, node

pytestmark = pytest.mark.anyio

__all__ = ["node"]  # the fixture


async def test_the_typescript_sdk_sse_client_calls_the_example_server_tools(node: str) -> None:
    with anyio.fail_after(60):
        async with _processes([([sys.executable, "-m", EXAMPLE_MODULE, "--port", "{port}"], None)]) as (server,):
            done = await anyio.run_process([node, "sse_client.mjs", f"{server.url}/sse"], cwd=TS_DIR, check=False)
    assert done.returncode == 0, f"{done.stderr.decode(errors='replace')}\n{server.log.decode(errors='replace')}"
    report = json.loads(done.stdout)
    assert {"echo", "countdown", "fail"} <= set(report["tools"]), report
    assert report["echo"] == "hi", report
    assert report["progress"] == [1, 2, 3], report
    assert report["countdown"] == "counted 3 steps", report
    assert report["fail"]["isError"] is True, report
    assert "boom" in report["fail"]["text"], report
