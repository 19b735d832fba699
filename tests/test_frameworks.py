"""The framework examples, each served by one line of ours as its own process, with the clients
of the README's versions table: the Python SDK's client of this interpreter's major and of the
other one, langchain-mcp-adapters' ``MultiServerMCPClient`` (sse), the TypeScript SDK's
``SSEClientTransport``, and this library's resuming client through a cut stream.

Which examples run depends on the environment: ``examples.server`` (an mcp 2.x ``MCPServer``) on
mcp 2.x, ``examples.frameworks.sdk1_server`` (an mcp 1.x ``FastMCP``) on mcp 1.x, and
``examples.frameworks.fastmcp_server`` wherever fastmcp is installed. Marked ``framework``: the
CI's matrix jobs run them (``.ci/matrix``), with ``MCP_SSE_TEST_OTHER_PYTHON`` (an interpreter
with the other SDK major) and ``MCP_SSE_TEST_LANGCHAIN_PYTHON`` (one with langchain-mcp-adapters);
without them the tests that need them fail, they are never skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_sse_transport import _sdk
from mcp_sse_transport.client import resumable_sse_client

from ._cluster import ROOT, Worker, _processes
from ._sdk_compat import Client, types
from ._support import CuttingProxy
from .test_outside_clients import TS_DIR, node

pytestmark = [pytest.mark.anyio, pytest.mark.framework]

__all__ = ["node"]  # the TypeScript SDK's fixture, shared with test_outside_clients

CLIENTS = ROOT / "tests" / "clients"


def _examples() -> list[str]:
    found = ["examples.server" if _sdk.MAJOR >= 2 else "examples.frameworks.sdk1_server"]
    if importlib.util.find_spec("fastmcp") is not None:
        found.append("examples.frameworks.fastmcp_server")
    return found


@pytest.fixture(params=_examples())
def example(request: pytest.FixtureRequest) -> str:
    module: str = request.param
    return module


@asynccontextmanager
async def served(module: str) -> AsyncIterator[Worker]:
    async with _processes([([sys.executable, "-m", module, "--port", "{port}"], None)]) as (server,):
        yield server


def _interpreter(variable: str) -> str:
    python = os.environ.get(variable)
    if not python:
        pytest.fail(f"${variable} is unset: .ci/matrix sets it for the framework jobs", pytrace=False)
    return python


async def _report(argv: list[str], server: Worker, cwd: Path = ROOT) -> dict[str, Any]:
    """A client process's JSON report; its output and the server's log if it failed."""
    done = await anyio.run_process(argv, cwd=cwd, check=False)
    assert done.returncode == 0, (
        f"{argv[:2]} failed:\n{done.stderr.decode(errors='replace')}\nserver:\n{server.log.decode(errors='replace')}"
    )
    report: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return report


def _assert_tools(report: dict[str, Any]) -> None:
    assert sorted(report["tools"]) == ["countdown", "echo", "fail"], report
    assert report["echo"] == "hi", report
    assert report["countdown"] == "counted 3 steps", report
    assert report["progress"] == [1, 2, 3], report
    assert "boom" in report["fail"]["text"], report


@pytest.mark.parametrize("streamable", [False, True], ids=["sse", "streamable-http"])
@pytest.mark.parametrize("other_major", [False, True], ids=["same-major-client", "other-major-client"])
async def test_the_python_sdk_clients_of_both_majors(example: str, streamable: bool, other_major: bool) -> None:
    python = _interpreter("MCP_SSE_TEST_OTHER_PYTHON") if other_major else sys.executable
    with anyio.fail_after(90):
        async with served(example) as server:
            url = f"{server.url}/mcp" if streamable else f"{server.url}/sse"
            argv = [python, "-m", "tests.clients.sdk_client", url, *(["--streamable"] if streamable else [])]
            report = await _report(argv, server)
    _assert_tools(report)
    assert report["fail"]["isError"] is True, report


async def test_langchain_mcp_adapters_over_sse(example: str) -> None:
    python = _interpreter("MCP_SSE_TEST_LANGCHAIN_PYTHON")
    with anyio.fail_after(120):
        async with served(example) as server:
            report = await _report([python, str(CLIENTS / "langchain_client.py"), f"{server.url}/sse"], server)
    _assert_tools(report)
    assert report["fail"]["raised"] is False, report  # the adapter returns a tool error as its text


async def test_the_typescript_sdk_sse_client(example: str, node: str) -> None:
    with anyio.fail_after(90):
        async with served(example) as server:
            report = await _report([node, str(TS_DIR / "sse_client.mjs"), f"{server.url}/sse"], server, TS_DIR)
    _assert_tools(report)
    assert report["fail"]["isError"] is True, report


async def test_the_resuming_client_gets_a_cut_call_s_progress_and_answer_once(example: str) -> None:
    """The stream is cut after the first progress notification of a call in flight: the client
    resumes with ``Last-Event-ID`` and gets the rest of the call's progress and its answer, each
    once, in the same session."""
    seen: list[float] = []
    first = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)
        first.set()

    with anyio.fail_after(90):
        async with served(example) as server:
            proxy = CuttingProxy(server.url, streams_only=True)
            async with (
                proxy.running() as proxied,
                Client(resumable_sse_client(f"{proxied}/sse"), mode="legacy") as session,
            ):
                async with anyio.create_task_group() as tg:
                    answers: list[Any] = []

                    async def call() -> None:
                        arguments = {"steps": 5, "interval": 0.2}
                        answers.append(await session.call_tool("countdown", arguments, progress_callback=on_progress))

                    tg.start_soon(call)
                    await first.wait()
                    proxy.cut()
                echo = await session.call_tool("echo", {"text": "same session"})
    assert proxy.cuts >= 1
    assert seen == [1, 2, 3, 4, 5]
    assert _text(answers[0]) == "counted 5 steps"
    assert _text(echo) == "same session"


def _text(result: Any) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))
