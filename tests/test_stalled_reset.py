"""Reset, don't close: over real sockets, a connection dropped because its client stopped reading
is reset (RST), so neither the kernel's buffers nor a FIN-WAIT-1 socket outlive it, and an event
stream's kernel send buffer is capped (``SseConfig.socket_send_buffer``), a POST's never."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import anyio
import pytest
from anyio.abc import SocketAttribute
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_sse_transport import ErrorCode, SlowConsumerError, SseConfig, encode_error, sse_app
from mcp_sse_transport._asgi import end_stream, open_stream

from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, serving
from .test_integration import OPEN, _Flood, initialize, lowlevel_server

pytestmark = pytest.mark.anyio

SEND_BUFFER = 96 * 1024
"""Not a size the kernel's autotuning lands on, so a socket showing twice it was capped by us."""


@dataclass
class _Returned:
    """Wraps an endpoint; ``returned`` is set once it has returned: the transport has ended the
    stream (and aborted the connection) by then."""

    app: ASGIApp
    returned: anyio.Event = field(default_factory=anyio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            self.returned.set()


@dataclass(frozen=True)
class _Socket:
    """A TCP socket as ``ss -tanm`` shows it."""

    state: str
    peer_port: int
    send_buffer: int | None
    """``tb`` of ``skmem``: the socket's send buffer, as the kernel holds it (twice the value set);
    ``None`` for a socket with no buffers left (TIME-WAIT)."""


_SS_ENTRY = re.compile(r"^(\S+)\s.*?\S+:\d+\s+\S+:(\d+)[^\n]*(?:\n\s+skmem:\([^)]*?\btb(\d+))?", re.MULTILINE)


async def _server_sockets(port: int, peer_port: int | None = None) -> list[_Socket]:
    """The server's connected sockets on ``port`` (to ``peer_port`` only, if given), from the
    kernel's own table."""
    peer = f" and dport = :{peer_port}" if peer_port is not None else ""
    result = await anyio.run_process(["/usr/bin/ss", "-Htanm", f"( sport = :{port}{peer} )"])
    return [
        _Socket(match.group(1), int(match.group(2)), int(match.group(3)) if match.group(3) else None)
        for match in _SS_ENTRY.finditer(result.stdout.decode())
        if match.group(1) != "LISTEN"
    ]


async def _after_the_drop(port: int, peer_port: int) -> list[_Socket]:
    """The server's sockets to ``peer_port`` once the one that served it is no longer established.

    A bounded poll, because this is the kernel's state and nothing signals it: the transport
    aborts the connection when it drops it, asyncio closes the socket a loop iteration later,
    and only the kernel's table says what became of it. The caller's ``fail_after`` bounds it."""
    while True:
        found = await _server_sockets(port, peer_port)
        if all(sock.state != "ESTAB" for sock in found):
            return found
        await anyio.sleep(0.01)


async def _read_to_the_end(raw: RawSseStream) -> tuple[int, BaseException]:
    """Read the connection until it ends; the bytes read and how it ended."""
    read = 0
    while True:
        try:
            read += len(await raw.stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            return read, exc


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def test_a_slow_consumer_cut_loose_is_reset_at_once_and_leaves_no_fin_wait_socket() -> None:
    # The grant timeout cuts it loose well before the stuck write's deadline; the final
    # SLOW_CONSUMER event gets one try of drain_timeout, then the connection is dropped.
    config = SseConfig(
        max_buffered_events=64,
        max_buffered_bytes=32 * 1024,
        grant_timeout=0.5,
        write_timeout=10,
        drain_timeout=0.5,
        socket_send_buffer=SEND_BUFFER,
    )
    app = sse_app(lowlevel_server(), transport_security=OPEN, config=config)
    flood = _Flood(app.state.sse_transport)
    endpoint = _Returned(flood)
    app.router.routes.append(Route("/flood", endpoint=endpoint, methods=["GET"]))
    with anyio.fail_after(30):
        async with serving(app) as base, RawSseStream.open(base, "/flood", rcvbuf=4096) as stalled:
            port, client_port = _port(base), stalled.stream.extra(SocketAttribute.local_port)
            # The cap is set before the response head, which open() has read.
            [stream_socket] = await _server_sockets(port, client_port)
            assert stream_socket.send_buffer == 2 * SEND_BUFFER  # Linux doubles the value set
            await flood.released.wait()
            cut_loose = anyio.current_time()
            assert isinstance(flood.outcome, SlowConsumerError)
            await endpoint.returned.wait()
            dropped = anyio.current_time()
            # Closed, the socket would sit in FIN-WAIT-1 trickling its buffer to a client that
            # never sees its stream end; reset, it is gone at once.
            assert await _after_the_drop(port, client_port) == []
            # The client reads what its small window held, then sees the reset.
            read, ending = await _read_to_the_end(stalled)
            reset = anyio.current_time()
            assert isinstance(ending, anyio.BrokenResourceError), ending
            assert isinstance(ending.__cause__, ConnectionResetError), ending.__cause__
    print(
        f"reset {reset - cut_loose:.3f} s after the cut ({reset - dropped:.4f} s after the drop), "
        f"{read} bytes read after it; server SO_SNDBUF {stream_socket.send_buffer}"
    )


async def test_a_write_past_its_deadline_drops_the_connection_with_a_reset() -> None:
    # Room enough for a minute: the write deadline, not the grant timeout, drops this one (and
    # the server, shutting down, gives the detached session half a second to be resumed).
    config = SseConfig(
        write_timeout=0.5, grant_timeout=60, session_grace=60, drain_timeout=0.5, socket_send_buffer=SEND_BUFFER
    )
    app = sse_app(lowlevel_server(), transport_security=OPEN, config=config)
    flood = _Flood(app.state.sse_transport)
    app.router.routes.append(Route("/flood", endpoint=flood, methods=["GET"]))
    with anyio.fail_after(30):
        async with serving(app) as base, RawSseStream.open(base, "/flood", rcvbuf=4096) as stalled:
            port, client_port = _port(base), stalled.stream.extra(SocketAttribute.local_port)
            await flood.started.wait()
            # No event says a write stalled: the kernel's state is what changes.
            assert await _after_the_drop(port, client_port) == []
            _, ending = await _read_to_the_end(stalled)
            assert isinstance(ending, anyio.BrokenResourceError), ending
            assert isinstance(ending.__cause__, ConnectionResetError), ending.__cause__
            assert not isinstance(flood.outcome, SlowConsumerError), flood.outcome


class _FinalEventThenDrop:
    """A stream ended by a failure whose client keeps up: its final error event, then the drop."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sink = await open_stream(send, scope, SEND_BUFFER)
        await sink(encode_error(ErrorCode.STORE_UNAVAILABLE, "Session store unavailable; the session ends"))
        await end_stream(scope, send, False, 1.0)


async def test_a_connection_dropped_with_nothing_unsent_is_closed_so_its_final_event_arrives() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    app.router.routes.append(Route("/final", endpoint=_FinalEventThenDrop(), methods=["GET"]))
    with anyio.fail_after(20):
        async with serving(app) as base, RawSseStream.open(base, "/final") as raw:
            final = await raw.next_event()
            assert final is not None and final.event == "error"
            assert final.json()["code"] == ErrorCode.STORE_UNAVAILABLE
            _, ending = await _read_to_the_end(raw)
            assert isinstance(ending, anyio.EndOfStream), ending  # a close (FIN), not a reset
            assert not raw.ended, "dropped, not completed: no terminating chunk"


async def test_only_event_streams_get_the_capped_send_buffer() -> None:
    config = SseConfig(socket_send_buffer=SEND_BUFFER)
    with anyio.fail_after(20):
        async with serving(sse_app(lowlevel_server(), transport_security=OPEN, config=config)) as base:
            async with RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
                await initialize(raw, http)  # POSTs on a kept-alive connection of their own
                client_port = raw.stream.extra(SocketAttribute.local_port)
                sockets = {sock.peer_port: sock for sock in await _server_sockets(_port(base))}
                assert sockets.pop(client_port).send_buffer == 2 * SEND_BUFFER
                assert sockets, "the POSTs' connection is open"
                assert all(sock.send_buffer != 2 * SEND_BUFFER for sock in sockets.values()), sockets


async def test_without_a_cap_the_kernel_sizes_the_send_buffer() -> None:
    default = SseConfig().socket_send_buffer
    assert default is not None
    config = SseConfig(socket_send_buffer=None)
    with anyio.fail_after(20):
        async with serving(sse_app(lowlevel_server(), transport_security=OPEN, config=config)) as base:
            async with RawSseStream.open(base) as raw:
                [stream_socket] = await _server_sockets(_port(base), raw.stream.extra(SocketAttribute.local_port))
                assert stream_socket.send_buffer != 2 * default, "None is not the default cap"
