"""Real servers and raw HTTP for the integration tests: uvicorn on 127.0.0.1, a free port."""

from __future__ import annotations

import json
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from starlette.types import ASGIApp

from examples.balancer import RoundRobin, splice
from mcp_sse_transport import uvicorn_server


def free_socket() -> socket.socket:
    """A listening socket on 127.0.0.1 with a port the kernel chose: connections queue in its
    backlog until uvicorn accepts them, so no test has to wait for the server to be ready."""
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # accepted sockets inherit it; without it every small response waits for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


@asynccontextmanager
async def serving(app: ASGIApp, log_level: str = "warning") -> AsyncIterator[str]:
    """Run ``app`` on a real uvicorn (the library's own server setup); yields its base URL."""
    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn_server(app, host="127.0.0.1", port=port, log_level=log_level, lifespan="on")
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=[sock]))
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class RawSseStream:
    """A GET on a raw socket: HTTP/1.1 chunked framing and SSE blocks, read by hand, so a test
    sees exactly what went on the wire (comments, terminating chunk, a dropped connection)."""

    stream: anyio.abc.SocketStream
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False
    """The terminating zero-length chunk arrived."""
    closed: bool = False
    """The server closed or reset the connection."""
    _raw: bytes = b""
    _consumed: int = 0

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        base_url: str,
        path: str = "/sse",
        headers: dict[str, str] | None = None,
        rcvbuf: int | None = None,
        *,
        post: bytes | None = None,
    ) -> AsyncIterator[RawSseStream]:
        """A GET of ``path`` (a POST of ``post``, as JSON, when given), its head read."""
        host, port = base_url.removeprefix("http://").split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the TCP window stays small too
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((host, int(port)))  # loopback, into the listening backlog: immediate
        stream = await anyio.abc.SocketStream.from_socket(sock)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        if post is None:
            head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n{extra}\r\n"
            await stream.send(head.encode())
        else:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json, text/event-stream\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(post)}\r\n{extra}\r\n"
            )
            await stream.send(head.encode() + post)
        raw = cls(stream)
        try:
            await raw._read_head()
            yield raw
        finally:
            await stream.aclose()

    async def _fill(self) -> bool:
        try:
            data = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError, OSError):
            self.closed = True
            return False
        self._raw += data
        return True

    async def _read_head(self) -> None:
        while b"\r\n\r\n" not in self._raw:
            if not await self._fill():
                raise ConnectionError("connection closed before the response head")
        head, self._raw = self._raw.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode().split("\r\n")
        self.status = int(status_line.split()[1])
        self.headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}

    async def _read_chunk(self) -> bool:
        """Decode one chunk into ``body``; False when the body ended or the connection dropped."""
        if self.ended:
            return False
        while b"\r\n" not in self._raw:
            if not await self._fill():
                return False
        size_line, rest = self._raw.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            if not await self._fill():
                return False
            rest = self._raw.split(b"\r\n", 1)[1]
        self.body += rest[:size]
        self._raw = rest[size + 2 :]
        if size == 0:
            self.ended = True
            return False
        return True

    async def next_block(self) -> bytes | None:
        """The next SSE block (an event or a comment), or None at the end of the stream."""
        while b"\r\n\r\n" not in self.body[self._consumed :]:
            if not await self._read_chunk():
                return None
        end = self.body.index(b"\r\n\r\n", self._consumed)
        block = self.body[self._consumed : end]
        self._consumed = end + 4
        return block

    async def next_event(self) -> SseEvent | None:
        """The next event, skipping comments; None at the end of the stream."""
        while (block := await self.next_block()) is not None:
            event = parse_block(block)
            if event is not None:
                return event
        return None

    async def drain(self) -> None:
        """Read until the stream ends or the connection drops."""
        while await self._read_chunk():
            pass


_FIELD = re.compile(r"^([^:]*)(?:: ?(.*))?$")


def parse_block(block: bytes) -> SseEvent | None:
    """One SSE block to an event; None for a comment-only block."""
    event = SseEvent()
    data: list[str] = []
    for line in re.split(r"\r\n|\r|\n", block.decode()):
        if line.startswith(":"):
            continue
        match = _FIELD.match(line)
        assert match is not None
        name, value = match.group(1), match.group(2) or ""
        if name == "event":
            event.event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event.id = value
        elif name == "retry":
            event.retry = int(value)
    if not data and event.id is None:
        return None
    event.data = "\n".join(data)
    return event


@asynccontextmanager
async def serving_connections(
    handle: Callable[[anyio.abc.SocketStream], Awaitable[None]],
) -> AsyncIterator[int]:
    """Accept connections on 127.0.0.1, a port the kernel picks (yielded), each handled by
    ``handle`` in a task of its own, until the ``with`` body ends: the tests' proxies."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        try:
            yield listener.extra(anyio.abc.SocketAttribute.local_port)
        finally:
            tg.cancel_scope.cancel()


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 whose open connections a test can cut at any moment, as a
    network drop would: both sides are shut down, whatever was in flight is lost.

    With several upstreams it is the example round-robin balancer: each connection goes to the
    next upstream that accepts it (one refusing connections, a dead worker, is skipped)."""

    def __init__(self, upstream: str | Sequence[str], *, streams_only: bool = False) -> None:
        urls = [upstream] if isinstance(upstream, str) else list(upstream)
        self._balancer = RoundRobin([(url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])) for url in urls])
        self._streams_only = streams_only
        """Cut only connections that opened with a GET (event streams), never a POST in flight."""
        self._pairs: set[tuple[anyio.abc.SocketStream, anyio.abc.SocketStream]] = set()
        self.cuts = 0
        self.routed: list[tuple[str, int]] = []
        """Each connection's request method and the upstream port it went to, in order."""
        self.lose_post_responses = 0
        """The next this many POSTs reach the server, whose answer is then lost with the client's
        connection: the client cannot tell whether they arrived."""

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        async with serving_connections(self._handle) as port:
            yield f"http://127.0.0.1:{port}"

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        try:
            upstream, port = await self._balancer.connect()
        except OSError:
            await client.aclose()
            return
        pair = (client, upstream)
        try:
            first = await client.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            await upstream.aclose()
            return
        self.routed.append((first.split(b" ", 1)[0].decode(errors="replace"), port))
        if first.startswith(b"POST ") and self.lose_post_responses > 0:
            self.lose_post_responses -= 1
            return await _lose_response(client, upstream, first)
        if not self._streams_only or first.startswith(b"GET "):
            self._pairs.add(pair)
        try:
            await splice(client, upstream, first)
        finally:
            self._pairs.discard(pair)

    def cut(self) -> None:
        """Reset every open connection."""
        for pair in list(self._pairs):
            for stream in pair:
                sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                with suppress(OSError):  # the peer may have gone already
                    sock.shutdown(socket.SHUT_RDWR)
        self.cuts += 1


async def _lose_response(client: anyio.abc.SocketStream, upstream: anyio.abc.SocketStream, first: bytes) -> None:
    """Forward a request, wait for the start of its answer, then reset the client's connection."""
    async with client, upstream, anyio.create_task_group() as tg:
        await upstream.send(first)
        tg.start_soon(_forward, client, upstream)
        with suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            await upstream.receive()  # the server answered
        sock = client.extra(anyio.abc.SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
        tg.cancel_scope.cancel()


async def _forward(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream) -> None:
    with suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        async for data in source:
            await sink.send(data)
