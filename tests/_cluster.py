"""Workers as real processes: the example server, several on their own ports, one Redis."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from ._sdk_compat import httpx as httpx2
from ._support import free_socket

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Worker:
    port: int
    process: anyio.abc.Process
    log: bytearray = field(default_factory=bytearray)
    grew: anyio.Event = field(default_factory=anyio.Event)
    """Set (and replaced) each time the log grows."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def logged(self, text: bytes) -> None:
        """Return once the log holds ``text``."""
        while text not in self.log:
            await self.grew.wait()


READY = b"Application startup complete"
"""uvicorn's line once a worker serves (its socket listens only then, even when bound before)."""
LISTENING = b"Uvicorn running on"
"""uvicorn's line once its socket listens: after READY when uvicorn binds it itself (``run()``),
before the workers' READY lines with ``--workers``. Ready means both."""


async def _read_log(worker: Worker, ready: anyio.Event, processes: int) -> None:
    assert worker.process.stdout is not None  # stderr too: uvicorn's access log is on stdout
    async for chunk in worker.process.stdout:
        worker.log += chunk
        worker.grew.set()
        worker.grew = anyio.Event()
        if not ready.is_set() and worker.log.count(READY) >= processes and LISTENING in worker.log:
            ready.set()
    ready.set()  # exited: the caller sees it did not start


def _options(redis_url: str, prefix: str, owner_lease: float, retry: float) -> list[str]:
    options = ["--redis-url", redis_url, "--redis-prefix", prefix]
    return [*options, "--owner-lease", str(owner_lease), "--retry", str(retry)]


@asynccontextmanager
async def _processes(
    commands: list[tuple[list[str], dict[str, str] | None]], processes: int = 1
) -> AsyncIterator[list[Worker]]:
    """Start each ``(command, extra environment)`` with a free port for ``{port}`` in it, and wait
    until its ``processes`` uvicorn workers serve; each is stopped with SIGTERM afterwards,
    unless a test killed it."""
    started: list[Worker] = []
    try:
        async with anyio.create_task_group() as tg:
            try:
                for command, env in commands:
                    sock = free_socket()
                    port = sock.getsockname()[1]
                    sock.close()  # the child binds it; uvicorn sets SO_REUSEADDR
                    argv = [part.replace("{port}", str(port)) for part in command]
                    environment = {**os.environ, **env} if env else None
                    process = await anyio.open_process(
                        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment
                    )
                    worker = Worker(port, process)
                    started.append(worker)
                    ready = anyio.Event()
                    tg.start_soon(_read_log, worker, ready, processes)
                    await ready.wait()
                    if process.returncode is not None or worker.log.count(READY) < processes:
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
    finally:
        with anyio.CancelScope(shield=True):
            for worker in started:  # close the pipes and the transport now, not at garbage collection
                await worker.process.aclose()


@asynccontextmanager
async def workers(
    redis_url: str, prefix: str, count: int = 3, *, owner_lease: float = 1.5, retry: float = 0.1
) -> AsyncIterator[list[Worker]]:
    """``count`` example servers (``python -m examples.server``) sharing ``redis_url``."""
    command = [sys.executable, "-m", "examples.server", "--port", "{port}"]
    command += _options(redis_url, prefix, owner_lease, retry)
    async with _processes([(command, None)] * count) as started:
        yield started


@asynccontextmanager
async def uvicorn_cli(
    redis_url: str, prefix: str, *uvicorn_args: str, owner_lease: float = 1.5, retry: float = 0.1
) -> AsyncIterator[Worker]:
    """The example app under uvicorn's own command line (``examples.server:app``), options
    through ``$EXAMPLE_SERVER_ARGS``, with ``uvicorn_args`` such as ``--workers 3``."""
    command = [sys.executable, "-m", "uvicorn", "examples.server:app", "--factory", "--port", "{port}"]
    command += ["--http", "mcp_sse_transport.serving:H11Protocol", *uvicorn_args]
    env = {"EXAMPLE_SERVER_ARGS": shlex.join(_options(redis_url, prefix, owner_lease, retry))}
    processes = int(uvicorn_args[uvicorn_args.index("--workers") + 1]) if "--workers" in uvicorn_args else 1
    async with _processes([(command, env)], processes) as (worker,):
        yield worker


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
