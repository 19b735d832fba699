"""The example server as its own process: the README's commands (the server, and the example
client against it by port), and a shutdown by signal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from mcp_sse_transport import ErrorCode

from ._sdk_compat import MAJOR, needs_related_progress
from ._support import RawSseStream, free_socket

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


async def test_sigterm_drains_streams_with_the_shutdown_event_and_terminating_chunk() -> None:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()  # the child binds it; uvicorn sets SO_REUSEADDR
    with anyio.fail_after(30):
        async with await anyio.open_process(
            [sys.executable, "-m", "examples.server", "--port", str(port)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        ) as process:
            assert process.stderr is not None
            log = b""
            while b"Uvicorn running" not in log:  # the server's own readiness line
                log += await process.stderr.receive()
            async with RawSseStream.open(f"http://127.0.0.1:{port}") as raw:
                endpoint = await raw.next_event()
                assert endpoint is not None and endpoint.event == "endpoint"
                process.send_signal(signal.SIGTERM)
                final = await raw.next_event()
                assert final is not None and final.event == "error"
                assert json.loads(final.data)["code"] == ErrorCode.SERVER_SHUTDOWN
                assert final.retry == 3000
                assert await raw.next_event() is None
                assert raw.ended, "the stream must end with its terminating chunk"
            async for chunk in process.stderr:
                log += chunk
            # uvicorn finishes its graceful shutdown, then re-raises the signal it captured.
            assert b"Finished server process" in log
            assert await process.wait() == -signal.SIGTERM


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param([], id="sse"),
        # the progress lines: on mcp 1.24 they go to the standalone GET stream, if the client has it open yet
        pytest.param(["--streamable"], id="streamable-http", marks=needs_related_progress),
    ],
)
async def test_the_example_client_calls_the_example_server_by_its_port(kind: list[str]) -> None:
    """Over either transport the example server serves: legacy SSE (``/sse``) and Streamable HTTP
    (``/mcp``)."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    log = bytearray()
    with anyio.fail_after(30):
        async with await anyio.open_process(
            [sys.executable, "-m", "examples.server", "--port", str(port)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        ) as server:
            assert server.stderr is not None
            async with anyio.create_task_group() as tg:
                ready = anyio.Event()

                async def read_log() -> None:
                    assert server.stderr is not None
                    async for chunk in server.stderr:
                        log.extend(chunk)
                        if b"Uvicorn running" in log:
                            ready.set()
                    ready.set()  # exited

                tg.start_soon(read_log)
                await ready.wait()
                assert server.returncode is None, log.decode(errors="replace")
                client = await anyio.run_process(
                    [sys.executable, "-m", "examples.client", "--port", str(port), *kind], cwd=ROOT, check=False
                )
                server.send_signal(signal.SIGTERM)
            assert await server.wait() == -signal.SIGTERM
    output = client.stdout.decode()
    assert client.returncode == 0, client.stderr.decode(errors="replace")
    assert output.splitlines() == [
        "tools: echo, countdown, fail",
        f"echo: ['hello over {'Streamable HTTP' if kind else 'SSE'}']",
        "  progress 1/3: step 1 of 3",
        "  progress 2/3: step 2 of 3",
        "  progress 3/3: step 3 of 3",
        "countdown: ['counted 3 steps']",
        "fail: is_error = True ['Error executing tool fail: this demo tool always fails, as expected']",
    ]
    text = log.decode(errors="replace")
    # The demo's tool error is one line of its own, not a traceback a newcomer would take for a bug.
    # (The SDK logs through rich when it is installed, which wraps a long line: look for its parts.)
    if MAJOR >= 2:  # 1.x's FastMCP logs no line for a tool error at all
        assert "Tool 'fail' failed:" in text and "as expected" in text, text
    assert "Traceback" not in text and "ERROR" not in text, text
