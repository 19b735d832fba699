"""A real ``redis-server`` for the tests: started on a free port, ready once it says so.

Readiness is read from the server's own log on its stdout (the "Ready to accept connections"
line), bounded by a timeout: no polling. A thread keeps draining the log afterwards, so the
server never blocks on a full pipe, and keeps its tail for error messages.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import anyio
import anyio.abc
from redis.asyncio import Redis

from ._support import serving_connections

__all__ = ["READY_LINE", "RedisProcess", "RedisServerMissingError", "StallingLink", "redis_server_binary"]

READY_LINE = b"Ready to accept connections"
DEBIAN_PACKAGE = "redis-server"


class RedisServerMissingError(RuntimeError):
    """No ``redis-server`` on PATH."""


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerMissingError(
            f"redis-server is not installed: install Debian's {DEBIAN_PACKAGE} package "
            f"(apt-get install {DEBIAN_PACKAGE}; ./scripts/test does), or set MCP_SSE_TEST_REDIS_URL"
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    """One ``redis-server`` without persistence (unless ``extra_args`` turn it on), in a
    directory of its own. ``start`` again after ``stop`` or ``kill`` restarts it on the same
    port and directory."""

    def __init__(self, *extra_args: str, directory: Path | None = None, ready_timeout: float = 10.0) -> None:
        self.extra_args = extra_args
        self.ready_timeout = ready_timeout
        self._own_directory = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="mcp-sse-redis-")) if directory is None else directory
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log: deque[bytes] = deque(maxlen=200)
        self._drainer: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server was never started")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> RedisProcess:
        if self.running:
            raise RuntimeError("already running")
        binary = redis_server_binary()
        # A port chosen by the kernel, freed just before the server binds it: another process
        # could take it meanwhile, rarely, so a first start tries a few; a restart keeps its port.
        for _ in range(1 if self.port is not None else 3):
            port = self.port if self.port is not None else _free_port()
            if self._spawn(binary, port):
                self.port = port
                return self
        raise RuntimeError(
            "redis-server did not become ready:\n" + b"".join(self.log).decode(errors="replace").rstrip()
        )

    def _spawn(self, binary: str, port: int) -> bool:
        """Start the server and read its log until it is ready; False if it exited first."""
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.directory), "--logfile", "", "--daemonize", "no", *self.extra_args]
        self.log.clear()
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert process.stdout is not None
        stdout = process.stdout
        deadline = time.monotonic() + self.ready_timeout
        pending = b""
        ready = False
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while not ready:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    process.kill()
                    process.wait()
                    stdout.close()
                    raise TimeoutError(
                        f"redis-server not ready within {self.ready_timeout} s:\n"
                        + b"".join(self.log).decode(errors="replace").rstrip()
                    )
                if not selector.select(remaining):
                    continue
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:  # exited (port taken, bad argument): its log says why
                    process.wait()
                    stdout.close()
                    self.log.append(pending)
                    return False
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self.log.append(line + b"\n")
                    ready = ready or READY_LINE in line
        self.log.append(pending)
        self.process = process
        self._drainer = threading.Thread(target=self._drain, args=(stdout,), daemon=True)
        self._drainer.start()
        return True

    def _drain(self, stdout: IO[bytes]) -> None:
        with stdout:
            for line in stdout:
                self.log.append(line)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis shuts down cleanly, saving if ``--save`` is on), then wait."""
        self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL: the server dies mid-flight, as in a crash."""
        self._end(signal.SIGKILL, timeout)

    def pause(self) -> None:
        """SIGSTOP: the server stops answering but keeps its connections, as a hung host would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            if sig != signal.SIGKILL:
                process.send_signal(signal.SIGCONT)  # a paused server must run to handle SIGTERM
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._drainer is not None:
            self._drainer.join(timeout)  # the log's end: the server's last words
            self._drainer = None

    def close(self) -> None:
        """Stop the server and remove the directory it was given by default."""
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisProcess:
        return self.start() if not self.running else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class StallingLink:
    """A TCP proxy on 127.0.0.1 in front of a Redis, whose link a test can stall: while stalled,
    nothing crosses it either way (connections stay open, new ones are accepted and wait), as a
    congested link, a failover or a slow ``BGSAVE`` looks to the workers. Run it in the test's
    event loop; the workers, in their own processes, connect to :attr:`url`."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.split("//")[1].split("/")[0].rsplit(":", 1)
        self._open = anyio.Event()
        self._open.set()
        self.stalls = 0
        self.url = ""

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        async with serving_connections(self._handle) as port:
            self.url = f"redis://127.0.0.1:{port}/0"
            yield self.url

    @asynccontextmanager
    async def stalled(self) -> AsyncIterator[None]:
        """Hold everything on the link for as long as the ``with`` body runs."""
        self._open = anyio.Event()
        self.stalls += 1
        try:
            yield
        finally:
            self._open.set()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        host, port = self._upstream
        async with client, await anyio.connect_tcp(host, int(port)) as upstream, anyio.create_task_group() as tg:
            tg.start_soon(self._pipe, client, upstream, tg.cancel_scope)
            tg.start_soon(self._pipe, upstream, client, tg.cancel_scope)

    async def _pipe(
        self, source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, scope: anyio.CancelScope
    ) -> None:
        try:
            async for data in source:
                await self._open.wait()  # held while stalled, then passed on in order
                await sink.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            scope.cancel()


@asynccontextmanager
async def deletion_of(redis: Redis, key: str) -> AsyncIterator[anyio.Event]:
    """An event set once ``key`` is deleted, from Redis's keyspace notifications (turned on for
    the duration): a test waits on Redis itself, not by asking it again and again."""
    (previous,) = (await redis.config_get("notify-keyspace-events")).values()
    await redis.config_set("notify-keyspace-events", "Kg")
    pubsub: Any = redis.pubsub()  # redis-py's PubSub is untyped
    db = redis.connection_pool.connection_kwargs.get("db", 0)
    deleted = anyio.Event()

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message" and message["data"] in (b"del", b"unlink"):
                deleted.set()
                return

    try:
        await pubsub.subscribe(f"__keyspace@{db}__:{key}")
        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            yield deleted
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await pubsub.aclose()
            await redis.config_set("notify-keyspace-events", previous or "")


async def lease_runs_out(redis: Redis, owner_key: str) -> None:
    """Return once the lease on ``owner_key`` has run out: a clock deadline, waited on its PTTL."""
    for _ in range(5):  # Redis and this process count the same milliseconds: once, barring rounding
        remaining = int(await redis.pttl(owner_key))
        if remaining <= 0:
            return
        await anyio.sleep(remaining / 1000 + 0.002)
    raise AssertionError(f"the lease on {owner_key} does not run out")
