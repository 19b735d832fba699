"""bounded_response: a response the SDK's own code writes, put through a flow-controlled stream.

A raw ASGI endpoint on a real uvicorn (127.0.0.1) plays the SDK's handler: it writes its
response through ``bounded_response(scope, send, config)``; a raw socket reads it. A JSON answer
passes through; an event stream's chunks go out as written, with heartbeats while idle; a
client that stops reading gets the producer cut loose with ``SLOW_CONSUMER``; a client that
drops its connection ends the producer (which, as the SDK's does, watches for the disconnect).
"""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from mcp_sse_transport import ErrorCode, SlowConsumerError
from mcp_sse_transport._asgi import ABORT_EXTENSION
from mcp_sse_transport.bounded_response import bounded_response
from mcp_sse_transport.config import SseConfig
from mcp_sse_transport.events import HEARTBEAT

from ._handlers import parse, quiet_config
from ._support import RawSseStream, parse_block, serving
from .test_asgi import Endpoint, app_of

pytestmark = pytest.mark.anyio

EVENT_STREAM = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]
BIG = b"data: " + b"x" * 65536 + b"\r\n\r\n"


def start(headers: list[tuple[bytes, bytes]], status: int = 200) -> Message:
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes, *, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


class Attempts:
    """The ``send`` under ``bounded_response``: records each body as its write is attempted,
    before the server takes it (a stalled write never reaches the wire)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.bodies: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            self.bodies.append(message.get("body", b""))
        await self._send(message)


class Producer:
    """What the SDK's handler did inside the block: its error, and whether the block raised."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.cancelled = False
        self.sending = False
        self.sent = 0
        self.block_raised: BaseException | None = None
        self.attempts: Attempts | None = None


def cap_send_buffer(scope: Scope, size: int = 16 * 1024) -> None:
    """Keep the kernel from buffering megabytes for a client that does not read."""
    scope["extensions"][ABORT_EXTENSION]["set_send_buffer"](size)


# -- JSON answers --------------------------------------------------------------------------------


async def test_a_json_answer_passes_through_unchanged() -> None:
    answer = b'{"jsonrpc":"2.0","id":1,"result":{"ok":true}}'

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with bounded_response(scope, send, quiet_config()) as bounded:
            await bounded(start([(b"content-type", b"application/json"), (b"x-custom", b"kept")], status=202))
            await bounded(body(answer[:10]))
            await bounded(body(answer[10:], more=False))

    endpoint = Endpoint(app)
    with anyio.fail_after(20):
        async with serving(app_of(endpoint, ("POST",))) as base, httpx.AsyncClient(base_url=base) as client:
            response = await client.post("/stream", content=b"{}")
            await endpoint.returned.wait()
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-custom"] == "kept"
    assert response.content == answer
    assert endpoint.error is None


# -- event streams ---------------------------------------------------------------------------------


async def test_event_stream_chunks_arrive_in_order_as_written_then_the_stream_ends() -> None:
    chunks = [
        b'event: message\r\nid: sdk-1\r\ndata: {"n":1}\r\n\r\n',
        b": a comment of the sdk's\r\n\r\n",
        b'event: message\r\ndata: {"n":2}\r\n\r\n',
        b'data: {"n":3}\r\n\r\n',
    ]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with bounded_response(scope, send, quiet_config()) as bounded:
            await bounded(start(EVENT_STREAM))
            for chunk in chunks[:-1]:
                await bounded(body(chunk))
            await bounded(body(chunks[-1], more=False))

    endpoint = Endpoint(app)
    with anyio.fail_after(20):
        async with serving(app_of(endpoint)) as base, RawSseStream.open(base, "/stream") as raw:
            assert raw.status == 200
            assert raw.headers["content-type"] == "text/event-stream"
            await raw.drain()
            await endpoint.returned.wait()
    assert raw.body == b"".join(chunks), "no ids, retry or events added: the SDK's stream as it wrote it"
    assert raw.ended, "a graceful end: the terminating chunk"
    assert [event.id for event in parse(raw.body)] == ["sdk-1", "sdk-1", "sdk-1"]
    assert endpoint.error is None


async def test_an_empty_body_chunk_writes_nothing_and_an_empty_final_one_ends_the_stream() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with bounded_response(scope, send, quiet_config()) as bounded:
            await bounded(start(EVENT_STREAM))
            await bounded(body(b""))
            await bounded(body(b"data: only\r\n\r\n"))
            await bounded(body(b"", more=False))

    endpoint = Endpoint(app)
    with anyio.fail_after(20):
        async with serving(app_of(endpoint)) as base, RawSseStream.open(base, "/stream") as raw:
            await raw.drain()
            await endpoint.returned.wait()
    assert raw.body == b"data: only\r\n\r\n"
    assert raw.ended


async def test_an_idle_event_stream_gets_heartbeats() -> None:
    resume = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async with bounded_response(scope, send, quiet_config(heartbeat_interval=0.05)) as bounded:
            await bounded(start(EVENT_STREAM))
            await bounded(body(b"data: first\r\n\r\n"))
            await resume.wait()  # the SDK's handler is busy: nothing to send meanwhile
            await bounded(body(b"data: last\r\n\r\n", more=False))

    endpoint = Endpoint(app)
    with anyio.fail_after(20):
        async with serving(app_of(endpoint)) as base, RawSseStream.open(base, "/stream") as raw:
            assert await raw.next_block() == b"data: first"
            assert await raw.next_block() == HEARTBEAT.removesuffix(b"\r\n\r\n")
            assert await raw.next_block() == HEARTBEAT.removesuffix(b"\r\n\r\n"), "every interval"
            resume.set()
            block = await raw.next_block()
            while block == HEARTBEAT.removesuffix(b"\r\n\r\n"):
                block = await raw.next_block()
            assert block == b"data: last"
            await raw.drain()
            await endpoint.returned.wait()
    assert raw.ended
    assert [event.data for event in parse(raw.body)] == ["first", "last"]


# -- slow and gone clients -------------------------------------------------------------------------


def slow_config() -> SseConfig:
    return quiet_config(max_buffered_events=4, grant_timeout=0.2, drain_timeout=0.2)


async def test_a_client_that_stops_reading_gets_the_producer_cut_loose() -> None:
    """The SDK's handler writes faster than the client reads: once the buffer stays full for
    ``grant_timeout`` its send raises ``SlowConsumerError``, the block swallows it, and the
    final ``SLOW_CONSUMER`` error event is attempted."""
    producer = Producer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        cap_send_buffer(scope)
        producer.attempts = Attempts(send)
        try:
            async with bounded_response(scope, producer.attempts, slow_config()) as bounded:
                await bounded(start(EVENT_STREAM))
                try:
                    while True:
                        await bounded(body(BIG))
                        producer.sent += 1
                except BaseException as exc:
                    producer.error = exc
                    raise
        except BaseException as exc:
            producer.block_raised = exc
            raise

    endpoint = Endpoint(app)
    with anyio.fail_after(30):
        async with serving(app_of(endpoint)) as base, RawSseStream.open(base, "/stream", rcvbuf=4096):
            await endpoint.returned.wait()  # the client reads nothing meanwhile
    assert isinstance(producer.error, SlowConsumerError)
    assert producer.block_raised is None, "the stream's own failure is not raised out of the block"
    assert endpoint.error is None
    assert producer.sent >= 4, "the buffer filled first"
    assert producer.attempts is not None
    final = [chunk for chunk in producer.attempts.bodies if b"event: error" in chunk]
    assert len(final) == 1, "the final event is attempted once"
    block = parse_block(final[0].rstrip(b"\r\n"))
    assert block is not None and block.event == "error"
    assert json.loads(block.data)["code"] == ErrorCode.SLOW_CONSUMER
    assert int(ErrorCode.SLOW_CONSUMER) == -32050


async def test_a_client_that_drops_its_connection_ends_the_producer() -> None:
    """The client goes while the SDK's handler waits for room: its disconnect watch cancels the
    handler (as the SDK's does), the stream ends with it, and the response returns."""
    producer = Producer()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        cap_send_buffer(scope)

        async def produce(bounded: Send) -> None:
            try:
                while True:
                    producer.sending = True
                    await bounded(body(BIG))
                    producer.sending = False
                    producer.sent += 1
            except anyio.get_cancelled_exc_class():
                producer.cancelled = True
                raise

        async def watch_disconnect(scope: anyio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            scope.cancel()

        try:
            async with bounded_response(scope, send, quiet_config(max_buffered_events=4)) as bounded:
                await bounded(start(EVENT_STREAM))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(produce, bounded)
                    tg.start_soon(watch_disconnect, tg.cancel_scope)
        except BaseException as exc:
            producer.block_raised = exc
            raise

    endpoint = Endpoint(app)
    with anyio.fail_after(30):
        async with serving(app_of(endpoint)) as base:
            async with RawSseStream.open(base, "/stream", rcvbuf=4096) as raw:
                assert await raw.next_block() == BIG.removesuffix(b"\r\n\r\n")
                await anyio.wait_all_tasks_blocked()  # the client reads no more: everything fills up
                assert producer.sending, "the producer waits for room"
                assert not endpoint.returned.is_set()
            await endpoint.returned.wait()
    assert producer.cancelled
    assert producer.block_raised is None
    assert endpoint.error is None
