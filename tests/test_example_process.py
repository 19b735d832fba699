"""The example server as its own process: the README's command, and a shutdown by signal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from mcp_sse_transport import ErrorCode

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
