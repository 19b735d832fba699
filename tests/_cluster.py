"""Workers as real processes: the example server, several on their own ports, one Redis."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import httpx2

from ._support import free_socket

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Worker:
    port: int
    process: anyio.abc.Process
    log: bytearray = field(default_factory=bytearray)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def _read_log(worker: Worker, ready: anyio.Event) -> None:
    assert worker.process.stderr is not None
    async for chunk in worker.process.stderr:
        worker.log += chunk
        if not ready.is_set() and b"Uvicorn running" in worker.log:  # the server's own readiness line
            ready.set()
    ready.set()  # exited: the caller sees it did not start


@asynccontextmanager
async def workers(
    redis_url: str, prefix: str, count: int = 3, *, owner_lease: float = 1.5, retry: float = 0.1
) -> AsyncIterator[list[Worker]]:
    """``count`` example servers sharing ``redis_url``; each stopped with SIGTERM afterwards,
    unless a test killed it."""
    started: list[Worker] = []
    async with anyio.create_task_group() as tg:
        try:
            for _ in range(count):
                sock = free_socket()
                port = sock.getsockname()[1]
                sock.close()  # the child binds it; uvicorn sets SO_REUSEADDR
                command = [sys.executable, "-m", "examples.server", "--port", str(port), "--redis-url", redis_url]
                command += ["--redis-prefix", prefix, "--owner-lease", str(owner_lease), "--retry", str(retry)]
                process = await anyio.open_process(command, cwd=ROOT, stderr=subprocess.PIPE)
                worker = Worker(port, process)
                started.append(worker)
                ready = anyio.Event()
                tg.start_soon(_read_log, worker, ready)
                await ready.wait()
                if process.returncode is not None or b"Uvicorn running" not in worker.log:
                    raise RuntimeError(f"worker did not start:\n{worker.log.decode(errors='replace')}")
            yield started
        finally:
            with anyio.CancelScope(shield=True):
                for worker in started:
                    if worker.process.returncode is None:
                        worker.process.terminate()
                with anyio.move_on_after(15):
                    for worker in started:
                        await worker.process.wait()
                for worker in started:
                    if worker.process.returncode is None:
                        worker.process.kill()
                        await worker.process.wait()
            tg.cancel_scope.cancel()


def one_request_per_connection(
    headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None, auth: httpx2.Auth | None = None
) -> httpx2.AsyncClient:
    """The SDK's HTTP client, without keep-alive: every request opens a connection of its own, so
    a load balancer spreads one session's requests over every worker."""
    return httpx2.AsyncClient(
        headers=headers,
        timeout=timeout if timeout is not None else httpx2.Timeout(30, read=300),
        auth=auth,
        limits=httpx2.Limits(max_keepalive_connections=0),
    )
