"""Benchmark clients: raw HTTP/1.1 over asyncio sockets (the same code for both servers), and the
SDK client for the full-stack and latency measurements. Every wait is bounded."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

MESSAGE_MARK = b"event: message\r\n"
ENDPOINT_MARK = b"event: endpoint\r\n"


def _request(port: int, target: str, headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n"
        f"Cache-Control: no-store\r\n{extra}\r\n"
    ).encode()


class _Counter(asyncio.Protocol):
    """Counts ``event: message`` lines in the raw response until ``n`` arrived.

    Both servers frame each event as ``event: message\\r\\ndata: ...\\r\\n\\r\\n`` and never split
    one event across HTTP chunks, so counting the marker (across TCP reads) counts events.
    """

    def __init__(self, n: int, done: asyncio.Future[float]) -> None:
        self.n = n
        self.done = done
        self.count = 0
        self.bytes = 0
        self.tail = b""
        self.head = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if len(self.head) < 16:
            self.head += data[:16]
        k = len(MESSAGE_MARK) - 1
        if len(data) >= k:
            self.count += (self.tail + data[:k]).count(MESSAGE_MARK) + data.count(MESSAGE_MARK)
            self.tail = data[-k:]
        else:
            joined = self.tail + data
            self.count += joined.count(MESSAGE_MARK) - self.tail.count(MESSAGE_MARK)
            self.tail = joined[-k:]
        if self.count >= self.n and not self.done.done():
            self.done.set_result(time.perf_counter())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed after {self.count}/{self.n} events ({exc})"))


async def push_run(port: int, n: int, size: int, time_limit: float) -> dict[str, float]:
    """GET /push and count events until ``n`` arrived: wall time from the request to the n-th event."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    transport, proto = await asyncio.wait_for(
        loop.create_connection(lambda: _Counter(n, done), "127.0.0.1", port), time_limit
    )
    try:
        start = time.perf_counter()
        transport.write(_request(port, f"/push?n={n}&size={size}"))
        end = await asyncio.wait_for(done, time_limit)
        if not proto.head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response {proto.head!r}")
        elapsed = end - start
        return {"events": n, "seconds": elapsed, "events_per_s": n / elapsed, "wire_bytes": proto.bytes}
    finally:
        transport.close()


class RawSession:
    """A raw GET that reads the response head and the endpoint event, then reads no more."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, endpoint: str) -> None:
        self.reader = reader
        self.writer = writer
        self.endpoint = endpoint

    @classmethod
    async def open(
        cls, port: int, target: str, time_limit: float, rcvbuf: int | None = None, headers: dict[str, str] | None = None
    ) -> RawSession:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised TCP window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), time_limit)
            # A small StreamReader limit too, so the client process does not soak up the stream.
            reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf or 2**16)
        except BaseException:
            sock.close()
            raise
        try:
            writer.write(_request(port, target, headers))
            buf = b""
            async with asyncio.timeout(time_limit):
                while not (ENDPOINT_MARK in buf and buf.find(b"\r\n\r\n", buf.find(ENDPOINT_MARK)) >= 0):
                    chunk = await reader.read(4096)
                    if not chunk:
                        raise ConnectionError(f"closed before the endpoint event: {buf[:200]!r}")
                    buf += chunk
            if not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response {buf[:100]!r}")
            start = buf.find(b"data: ", buf.find(ENDPOINT_MARK)) + 6
            endpoint = buf[start : buf.find(b"\r\n", start)].decode()
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, endpoint)

    def close(self) -> None:
        with suppress(Exception):
            self.writer.transport.abort()


async def open_many(port: int, target: str, count: int, concurrency: int, time_limit: float) -> list[RawSession]:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> RawSession:
        async with sem:
            return await RawSession.open(port, target, time_limit)

    return list(await asyncio.gather(*(one() for _ in range(count))))


# -- resumption --------------------------------------------------------------------------------


def dechunk(raw: bytes) -> bytes:
    """The payload of the complete HTTP/1.1 chunks at the start of ``raw`` (a body in chunked
    transfer coding); an incomplete last chunk is left out."""
    out: list[bytes] = []
    pos = 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            break
        size = int(raw[pos:eol].split(b";", 1)[0], 16)
        end = eol + 2 + size
        if size == 0 or len(raw) < end + 2:
            break
        out.append(raw[eol + 2 : end])
        pos = end + 2
    return b"".join(out)


def split_response(raw: bytes) -> tuple[bytes, bytes]:
    """(head, decoded body so far) of a raw HTTP/1.1 response."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return raw, b""
    return head, dechunk(rest) if b"transfer-encoding: chunked" in head.lower() else rest


def sse_events(body: bytes) -> list[dict[str, str]]:
    """The complete events of a decoded SSE body (both servers end lines with CRLF), each as its
    fields (one ``data:`` line each here); comments (heartbeats) are skipped."""
    events: list[dict[str, str]] = []
    for block in body.split(b"\r\n\r\n")[:-1]:
        fields: dict[str, str] = {}
        for line in block.split(b"\r\n"):
            if not line or line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            fields[name.decode()] = value.removeprefix(b" ").decode()
        if fields:
            events.append(fields)
    return events


async def read_first_message(port: int, target: str, time_limit: float) -> dict[str, Any]:
    """GET ``target``, read until the first ``message`` event is complete, then drop the connection
    (abort, as a client whose network went away). Returns the endpoint event's URL and the message
    event's fields (no ``id`` where the server sends none)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), time_limit)
    raw = b""
    events: list[dict[str, str]] = []
    try:
        writer.write(_request(port, target))
        async with asyncio.timeout(time_limit):
            while not any(e.get("event") == "message" for e in events):
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionError(f"closed before the first message event: {raw[:200]!r}")
                raw += chunk
                events = sse_events(split_response(raw)[1])
    finally:
        with suppress(Exception):
            writer.transport.abort()
    if not raw.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response {raw[:100]!r}")
    endpoints = [e["data"] for e in events if e.get("event") == "endpoint"]
    if not endpoints:
        raise RuntimeError(f"no endpoint event before the first message: {raw[:300]!r}")
    return {"endpoint": endpoints[0], "message": next(e for e in events if e.get("event") == "message")}


class _ReplayCounter(_Counter):
    """A ``_Counter`` that also notes when the first ``message`` event arrived, and keeps every
    byte so the stream can be checked afterwards (not while timing)."""

    def __init__(self, n: int, done: asyncio.Future[float], first: asyncio.Future[float]) -> None:
        super().__init__(n, done)
        self.first = first
        self.chunks: list[bytes] = []
        self.head_at: float | None = None

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.head_at is None:
            self.head_at = now
        self.chunks.append(data)
        super().data_received(data)
        if self.count and not self.first.done():
            self.first.set_result(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.first.done():
            self.first.set_exception(ConnectionError(f"closed before the first replayed event ({exc})"))
        super().connection_lost(exc)


async def resume_run(
    port: int, target: str, last_event_id: str, n: int, time_limit: float, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Reconnect to ``target`` with ``Last-Event-ID`` and count ``message`` events until ``n``
    arrived. Times from opening the new connection (connect, then the request) to the first
    replayed event and to the n-th; then 100 ms more of listening, so that an event beyond the
    n-th would show up in the returned ``events`` (every event of the stream, parsed). ``head_s``
    is when the first bytes (the response head) arrived. ``headers``: more request headers."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[float] = loop.create_future()
    done: asyncio.Future[float] = loop.create_future()
    start = time.perf_counter()
    transport, proto = await asyncio.wait_for(
        loop.create_connection(lambda: _ReplayCounter(n, done, first), "127.0.0.1", port), time_limit
    )
    try:
        transport.write(_request(port, target, {**(headers or {}), "Last-Event-ID": last_event_id}))
        async with asyncio.timeout(time_limit):
            first_at = await first
            done_at = await done
        await asyncio.sleep(0.1)
    finally:
        for future in (first, done):  # after a timeout: nothing left for connection_lost to set
            if not future.done():
                future.cancel()
        transport.close()
    raw = b"".join(proto.chunks)
    if not raw.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response {raw[:100]!r}")
    return {
        "head_s": (proto.head_at or first_at) - start,
        "first_s": first_at - start,
        "all_s": done_at - start,
        "wire_bytes": len(raw),
        "events": sse_events(split_response(raw)[1]),
    }


async def http_get_json(port: int, target: str, time_limit: float) -> Any:
    import json

    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), time_limit)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        async with asyncio.timeout(time_limit):
            raw = await reader.read(-1)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"GET {target}: {head[:100]!r}")
    return json.loads(body)


@asynccontextmanager
async def sdk_client(port: int) -> AsyncIterator[Any]:
    """The SDK's legacy SSE client, connected to ``/sse`` and initialized."""
    from mcp.client.client import Client
    from mcp.client.sse import sse_client

    async with Client(sse_client(f"http://127.0.0.1:{port}/sse", timeout=10), mode="legacy") as client:
        yield client


async def call_progress(client: Any, count: int, time_limit: float) -> dict[str, float]:
    """Call the ``progress`` tool; notifications/s over the whole call (request to result)."""
    received = 0

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        nonlocal received
        received += 1

    start = time.perf_counter()
    async with asyncio.timeout(time_limit):
        result = await client.call_tool("progress", {"count": count}, progress_callback=on_progress)
    elapsed = time.perf_counter() - start
    if result.is_error:
        raise RuntimeError(f"tool failed: {result}")
    # Notifications of one request are delivered in order before its response is.
    if received != count:
        raise RuntimeError(f"got {received} of {count} progress notifications")
    return {"notifications": count, "seconds": elapsed, "notifications_per_s": count / elapsed}


class RawMcpSession:
    """An initialized MCP session driven over raw sockets: a GET stream for the server's events and
    one keep-alive connection for POSTs (each request one write). Used for round-trip latency, so
    that what is timed is the server, not the SDK client's own per-message work."""

    def __init__(self, port: int, stream: RawSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.port = port
        """Where the POSTs go."""
        self.stream = stream
        self.reader = reader
        self.writer = writer
        self.next_id = 1
        self.buf = b""

    @classmethod
    async def open(cls, port: int, time_limit: float = 10, post_port: int | None = None) -> RawMcpSession:
        """``post_port``: POST to another server than the stream's (a worker of the same Redis
        cluster, which hands each POST to the session's owner); by default the stream's."""
        stream = await RawSession.open(port, "/sse", time_limit)
        port = post_port if post_port is not None else port
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), time_limit)
        except BaseException:
            stream.close()
            raise
        self = cls(port, stream, reader, writer)
        try:
            params = {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "0"},
            }
            await self.request("initialize", params, time_limit)
            await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"}, time_limit)
        except BaseException:
            self.close()
            raise
        return self

    async def _post(self, message: dict[str, Any], time_limit: float) -> None:
        import json

        body = json.dumps(message, separators=(",", ":")).encode()
        self.writer.write(
            f"POST {self.stream.endpoint} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        async with asyncio.timeout(time_limit):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await self.reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 202"):
            raise RuntimeError(f"POST answered {head[:40]!r}")

    async def request(self, method: str, params: dict[str, Any] | None, time_limit: float) -> None:
        """POST a request and wait for its response event on the stream."""
        request_id = self.next_id
        self.next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            message["params"] = params
        await self._post(message, time_limit)
        mark = b'"id":%d' % request_id
        async with asyncio.timeout(time_limit):
            while mark not in self.buf:
                chunk = await self.stream.reader.read(65536)
                if not chunk:
                    raise ConnectionError("stream ended")
                self.buf = self.buf[-64:] + chunk
        self.buf = b""

    async def ping_for(
        self, seconds: float, max_pings: int = 100_000, starts: list[float] | None = None
    ) -> list[float]:
        """Sequential pings for ``seconds``: round-trip times in milliseconds (POST to response
        event); each ping's ``perf_counter()`` start goes to ``starts`` if given."""
        rtts: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and len(rtts) < max_pings:
            t0 = time.perf_counter()
            await self.request("ping", None, 10)
            rtts.append((time.perf_counter() - t0) * 1000)
            if starts is not None:
                starts.append(t0)
        return rtts

    def close(self) -> None:
        with suppress(Exception):
            self.writer.transport.abort()
        self.stream.close()


# -- scale-out: a stream read event by event, across a worker's death ---------------------------


class SseStream:
    """A raw GET whose SSE events are parsed as they complete (HTTP/1.1 chunked body), each with
    the ``perf_counter()`` of the read that completed it. For the takeover measurement, where
    the client must know the last event id it saw when the connection breaks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.head = b""
        self.head_at: float | None = None
        self._raw = b""  # received and not yet de-chunked
        self._body = b""  # de-chunked and not yet a complete event
        self._events: list[tuple[float, dict[str, str]]] = []
        self.last_id: str | None = None
        self.eof = False

    @classmethod
    async def open(cls, port: int, target: str, time_limit: float, headers: dict[str, str] | None = None) -> SseStream:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), time_limit)
        writer.write(_request(port, target, headers))
        return cls(reader, writer)

    def _event_stream(self, head: bytes) -> bool:
        """Whether the response with ``head`` is an event stream to parse: it must be (the
        takeover measurement reads a stream), else RuntimeError."""
        if not head.startswith(b"HTTP/1.1 200") or b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"unexpected response {head[:200]!r}")
        return True

    def _parse(self, now: float) -> None:
        if not self.head:
            head, sep, rest = self._raw.partition(b"\r\n\r\n")
            if not sep:
                return
            self.head, self.head_at, self._raw = head, now, rest
            if not self._event_stream(head):
                return
        body, self._raw, eof = take_chunks(self._raw)
        self._body += body
        self.eof = self.eof or eof
        *blocks, self._body = self._body.split(b"\r\n\r\n")
        for event in sse_events(b"\r\n\r\n".join(blocks) + b"\r\n\r\n") if blocks else []:
            if "id" in event:
                self.last_id = event["id"]
            self._events.append((now, event))

    async def next_event(self, time_limit: float) -> tuple[float, dict[str, str]] | None:
        """The next event and when it arrived; ``None`` once the connection ended (closed or
        reset, as when the server process is killed). TimeoutError after ``time_limit``."""
        async with asyncio.timeout(time_limit):
            while not self._events:
                if self.eof:
                    return None
                try:
                    chunk = await self.reader.read(65536)
                except (ConnectionError, OSError):
                    chunk = b""
                if not chunk:
                    self.eof = True
                    return None
                self._raw += chunk
                self._parse(time.perf_counter())
        return self._events.pop(0)

    def close(self) -> None:
        with suppress(Exception):
            self.writer.transport.abort()


async def post_json(port: int, endpoint: str, message: dict[str, Any], time_limit: float) -> int:
    """POST one JSON-RPC message to ``endpoint`` on its own connection; the HTTP status."""
    import json

    body = json.dumps(message, separators=(",", ":")).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), time_limit)
    try:
        writer.write(
            f"POST {endpoint} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        async with asyncio.timeout(time_limit):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1])


def take_chunks(raw: bytes) -> tuple[bytes, bytes, bool]:
    """The whole chunks at the start of a chunked HTTP body ``raw``: their bytes, what is left
    (a partial chunk), and whether the terminating chunk came (then nothing is left)."""
    body = b""
    while True:
        eol = raw.find(b"\r\n")
        if eol < 0:
            return body, raw, False
        size = int(raw[:eol].split(b";", 1)[0], 16)
        end = eol + 2 + size
        if size == 0:
            return body, b"", True
        if len(raw) < end + 2:
            return body, raw, False
        body += raw[eol + 2 : end]
        raw = raw[end + 2 :]
