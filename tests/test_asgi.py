"""_asgi: a session's stream as an ASGI response (head, body chunks, terminator, abort), the
client's disconnect, bounded writes, and stream_session, over a real uvicorn on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from mcp_sse_transport import ErrorCode, SessionHandler, SessionState
from mcp_sse_transport._asgi import (
    ABORT_EXTENSION,
    REFUSED,
    SSE_HEADERS,
    disconnected,
    end_stream,
    open_stream,
    stream_session,
    write_within,
)
from mcp_sse_transport.ids import parse_event_id
from mcp_sse_transport.store import BEFORE_FIRST

from ._handlers import quiet_config
from ._support import RawSseStream, parse_block, serving

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"
PREFACE = b"event: endpoint\r\ndata: /messages/?session_id=x\r\n\r\n"

App = Callable[[Scope, Receive, Send], Awaitable[None]]


class Endpoint:
    """A raw ASGI app as a route's endpoint (an instance, so Starlette passes the ASGI triple on);
    ``returned`` is set once it has returned."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.returned = anyio.Event()
        self.error: BaseException | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.returned.set()


def app_of(endpoint: Endpoint, methods: tuple[str, ...] = ("GET",)) -> Starlette:
    return Starlette(routes=[Route("/stream", endpoint=endpoint, methods=list(methods))])


def recording(scope: Scope, calls: list[tuple[Any, ...]]) -> Scope:
    """The scope with the server's own extension, each of its calls recorded, then passed on."""
    offered = scope["extensions"][ABORT_EXTENSION]

    def recorded(name: str) -> Callable[..., object]:
        def call(*args: Any) -> object:
            calls.append((name, *args))
            return offered[name](*args)

        return call

    return {**scope, "extensions": {**scope["extensions"], ABORT_EXTENSION: {n: recorded(n) for n in offered}}}


def without_extension(scope: Scope) -> Scope:
    """The scope as a server that offers no abort extension passes it."""
    return {**scope, "extensions": {}}


def heads_recorded(send: Send, calls: list[tuple[Any, ...]]) -> Send:
    async def recorded(message: Message) -> None:
        if message["type"] == "http.response.start":
            calls.append(("head", message["status"]))
        await send(message)

    return recorded


# -- constants ---------------------------------------------------------------------------------------


def test_abort_extension_name() -> None:
    assert ABORT_EXTENSION == "mcp_sse_transport.abort"


def test_sse_headers() -> None:
    assert dict(SSE_HEADERS) == {
        b"content-type": b"text/event-stream; charset=utf-8",
        b"cache-control": b"no-store",
        b"connection": b"keep-alive",
        b"x-accel-buffering": b"no",
    }


def test_refused_is_a_superseded_error_event() -> None:
    event = parse_block(REFUSED.rstrip(b"\r\n"))
    assert event is not None and event.event == "error"
    assert event.json() == {"code": ErrorCode.SUPERSEDED, "message": "A later resume of this session took it over"}


# -- open_stream, end_stream ---------------------------------------------------------------------------


async def test_open_stream_sends_the_event_stream_head_then_chunks_and_a_graceful_end_terminates_it() -> None:
    calls: list[tuple[Any, ...]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope = recording(scope, calls)
        sink = await open_stream(send, scope)
        await sink(b"data: one\r\n\r\n")
        await sink(b"data: two\r\n\r\ndata: three\r\n\r\n")
        await end_stream(scope, send, True, 5)

    endpoint = Endpoint(app)
    with anyio.fail_after(20):
        async with serving(app_of(endpoint)) as base, RawSseStream.open(base, "/stream") as raw:
            assert raw.status == 200
            assert raw.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert raw.headers["cache-control"] == "no-store"
            assert raw.headers["x-accel-buffering"] == "no"
            assert raw.headers["transfer-encoding"] == "chunked"
            assert [await raw.next_event() for _ in range(3)] == [
                parse_block(b"data: one"),
                parse_block(b"data: two"),
                parse_block(b"data: three"),
            ]
            assert await raw.next_event() is None
            assert raw.ended, "the terminating chunk"
            assert not raw.closed, "a graceful end leaves the connection to HTTP keep-alive"
            await endpoint.returned.wait()
    assert endpoint.error is None
    assert calls == [], "neither the send buffer capped nor the connection aborted"


async def test_open_stream_caps_the_send_buffer_before_the_head() -> None:
    calls: list[tuple[Any, ...]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await open_stream(heads_recorded(send, calls), recording(scope, calls), 64 * 1024)
        await end_stream(scope, send, True, 5)

    with anyio.fail_after(20):
        async with serving(app_of(Endpoint(app))) as base, RawSseStream.open(base, "/stream") as raw:
            await raw.drain()
    assert calls == [("set_send_buffer", 64 * 1024), ("head", 200)]


@pytest.mark.parametrize(
    ("with_scope", "send_buffer"), [(True, None), (False, 64 * 1024)], ids=["no cap", "no scope to offer it"]
)
async def test_open_stream_caps_nothing_without_a_cap_and_a_scope(with_scope: bool, send_buffer: int | None) -> None:
    calls: list[tuple[Any, ...]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope = recording(scope, calls)
        await open_stream(heads_recorded(send, calls), scope if with_scope else None, send_buffer)
        await end_stream(scope, send, True, 5)

    with anyio.fail_after(20):
        async with serving(app_of(Endpoint(app))) as base, RawSseStream.open(base, "/stream") as raw:
            await raw.drain()
            assert raw.ended
    assert calls == [("head", 200)]


async def test_open_stream_on_a_server_without_the_extension_still_streams() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope = without_extension(scope)
        sink = await open_stream(send, scope, 64 * 1024)
        await sink(b"data: served\r\n\r\n")
        await end_stream(scope, send, False, 5)  # nothing to abort with: ended gracefully instead

    with anyio.fail_after(20):
        async with serving(app_of(Endpoint(app))) as base, RawSseStream.open(base, "/stream") as raw:
            assert raw.status == 200
            event = await raw.next_event()
            assert event is not None and event.data == "served"
            assert await raw.next_event() is None
            assert raw.ended


async def test_an_end_that_is_not_graceful_aborts_the_connection_without_the_terminator() -> None:
    calls: list[tuple[Any, ...]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope = recording(scope, calls)
        sink = await open_stream(send, scope)
        await sink(b"data: last words\r\n\r\n")
        await end_stream(scope, send, False, 5)

    with anyio.fail_after(20):
        async with serving(app_of(Endpoint(app))) as base, RawSseStream.open(base, "/stream") as raw:
            event = await raw.next_event()
            assert event is not None and event.data == "last words", "what the kernel took still arrives"
            await raw.drain()
            assert raw.closed
            assert not raw.ended, "dropped, not completed"
    assert calls == [("abort",)]


async def test_end_stream_gives_up_on_a_terminator_the_client_does_not_take() -> None:
    """A client that stopped reading: writes stall (write_within says so), and the terminator's
    write is given up after ``within`` instead of holding the response open."""
    outcome: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sink = await open_stream(send, scope, 16 * 1024)
        chunk = b"data: " + b"x" * 65536 + b"\r\n\r\n"
        written = 0
        while await write_within(sink, chunk, 0.2):
            written += 1
        outcome["written"] = written
        await end_stream(scope, send, True, 0.2)
        outcome["ended"] = True

    endpoint = Endpoint(app)
    with anyio.fail_after(30):
        async with serving(app_of(endpoint)) as base, RawSseStream.open(base, "/stream", rcvbuf=4096):
            await endpoint.returned.wait()  # the client reads nothing meanwhile
    assert outcome["ended"] is True
    assert endpoint.error is None


# -- disconnected --------------------------------------------------------------------------------------


async def test_disconnected_returns_once_the_client_has_gone_skipping_its_body() -> None:
    received: list[str] = []
    waiting = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def recorded() -> Message:
            message = await receive()
            received.append(message["type"])
            return message

        await open_stream(send, scope)
        waiting.set()
        await disconnected(recorded)()

    endpoint = Endpoint(app)
    with anyio.fail_after(20):
        async with serving(app_of(endpoint, ("POST",))) as base:
            host, port = base.removeprefix("http://").split(":")
            async with await anyio.connect_tcp(host, int(port)) as client:
                await client.send(
                    f"POST /stream HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 5\r\n\r\nhello".encode()
                )
                await waiting.wait()
                assert not endpoint.returned.is_set()
            await endpoint.returned.wait()
    assert endpoint.error is None
    assert received == ["http.request", "http.disconnect"]


# -- write_within ----------------------------------------------------------------------------------------


async def test_write_within_a_write_that_completes() -> None:
    with anyio.fail_after(5):
        send_stream, receive_stream = anyio.create_memory_object_stream[bytes](1)
        with send_stream, receive_stream:
            assert await write_within(send_stream.send, b"chunk", 5) is True
            assert receive_stream.receive_nowait() == b"chunk"


async def test_write_within_a_failed_write_counts_as_not_written() -> None:
    with anyio.fail_after(5):
        send_stream, receive_stream = anyio.create_memory_object_stream[bytes](1)
        receive_stream.close()  # the peer is gone: the send raises BrokenResourceError
        with send_stream:
            assert await write_within(send_stream.send, b"chunk", 5) is False


async def test_write_within_a_stalled_write_is_given_up() -> None:
    with anyio.fail_after(5):
        send_stream, receive_stream = anyio.create_memory_object_stream[bytes](0)  # nobody receives
        with send_stream, receive_stream:
            assert await write_within(send_stream.send, b"chunk", 0.05) is False
            with pytest.raises(anyio.WouldBlock):
                receive_stream.receive_nowait()  # the write was cancelled, not left pending


# -- stream_session --------------------------------------------------------------------------------------


def session_endpoint(handler: SessionHandler, **options: Any) -> Endpoint:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await stream_session(handler, scope, receive, send, PREFACE, **options)

    return Endpoint(app)


async def test_a_new_session_streams_its_preface_and_events_until_it_closes() -> None:
    handler = SessionHandler(SESSION, quiet_config())
    endpoint = session_endpoint(handler, attachment=handler.attach())
    with anyio.fail_after(20):
        async with serving(app_of(endpoint)) as base, RawSseStream.open(base, "/stream") as raw:
            assert raw.headers["content-type"] == "text/event-stream; charset=utf-8"
            preface = await raw.next_event()
            assert preface is not None and preface.event == "endpoint"
            await handler.send("hello")
            event = await raw.next_event()
            assert event is not None and (event.event, event.data) == ("message", "hello")
            parsed = parse_event_id(event.id or "")
            assert parsed is not None and parsed.session_id == SESSION and parsed.secret == handler.secret
            await handler.close()
            assert await raw.next_event() is None
            assert raw.ended, "closed gracefully: the terminating chunk"
            await endpoint.returned.wait()
    assert endpoint.error is None
    assert handler.state is SessionState.CLOSED


async def test_a_resume_replays_what_the_session_sent_while_detached() -> None:
    handler = SessionHandler(SESSION, quiet_config())
    await handler.send("while detached")
    endpoint = session_endpoint(handler, after=BEFORE_FIRST)
    with anyio.fail_after(20):
        async with serving(app_of(endpoint)) as base, RawSseStream.open(base, "/stream") as raw:
            preface = await raw.next_event()
            assert preface is not None and preface.event == "endpoint"
            replayed = await raw.next_event()
            assert replayed is not None and replayed.data == "while detached"
            assert handler.attached and handler.claimed
            await handler.close()
            assert await raw.next_event() is None
            assert raw.ended


async def test_a_resume_supersedes_the_connection_still_attached() -> None:
    handler = SessionHandler(SESSION, quiet_config())
    first_endpoint = session_endpoint(handler, after=BEFORE_FIRST)
    second_endpoint = session_endpoint(handler, after=BEFORE_FIRST)
    app = Starlette(
        routes=[
            Route("/first", endpoint=first_endpoint, methods=["GET"]),
            Route("/second", endpoint=second_endpoint, methods=["GET"]),
        ]
    )
    with anyio.fail_after(20):
        async with serving(app) as base, RawSseStream.open(base, "/first") as first:
            assert (await first.next_event()) is not None  # its preface: attached
            async with RawSseStream.open(base, "/second") as second:
                superseded = await first.next_event()
                assert superseded is not None and superseded.event == "error"
                assert superseded.json()["code"] == ErrorCode.SUPERSEDED
                assert await first.next_event() is None
                assert first.ended
                await first_endpoint.returned.wait()
                preface = await second.next_event()
                assert preface is not None and preface.event == "endpoint"
                await handler.send("to the latest")
                event = await second.next_event()
                assert event is not None and event.data == "to the latest"
                await handler.close()
                await second.drain()
                assert second.ended


async def test_a_stream_whose_head_was_sent_goes_on_through_its_sink() -> None:
    handler = SessionHandler(SESSION, quiet_config())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        sink = await open_stream(send, scope)
        await sink(b"data: before the session\r\n\r\n")
        await stream_session(handler, scope, receive, send, PREFACE, attachment=handler.attach(), sink=sink)

    endpoint = Endpoint(app)
    with anyio.fail_after(20):
        async with serving(app_of(endpoint)) as base, RawSseStream.open(base, "/stream") as raw:
            first = await raw.next_event()
            assert first is not None and first.data == "before the session"
            preface = await raw.next_event()
            assert preface is not None and preface.event == "endpoint"
            await handler.close()
            await raw.drain()
            assert raw.ended
            await endpoint.returned.wait()
    assert endpoint.error is None, "one response head only"


async def test_a_client_that_disconnects_ends_the_stream_and_leaves_the_session_for_a_resume() -> None:
    handler = SessionHandler(SESSION, quiet_config())
    endpoint = session_endpoint(handler, attachment=handler.attach())
    with anyio.fail_after(20):
        async with serving(app_of(endpoint)) as base:
            async with RawSseStream.open(base, "/stream") as raw:
                assert (await raw.next_event()) is not None
                assert handler.attached
            await endpoint.returned.wait()
    assert endpoint.error is None
    assert not handler.attached
    assert handler.state is SessionState.OPEN, "kept for session_grace"
