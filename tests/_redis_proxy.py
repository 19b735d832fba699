"""A TCP proxy between workers and Redis that can lose the reply to a command, as a network
drop right after Redis ran it would: the command runs, its reply is swallowed and the client's
connection is reset, so the client cannot tell whether it ran.

It reads the RESP framing both ways (commands from the client, replies from Redis, matched in
order on each connection), so a test names the command whose reply to lose by what it is
(``EVALSHA`` on a session's ``seen`` key, a ``PUBLISH`` of a handed-over POST), not by timing.
A connection that subscribes (pub/sub: replies without commands) is copied as it is.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

import anyio
import anyio.abc

from ._support import serving_connections

__all__ = ["Command", "RedisProxy", "Swallow"]

Command = list[bytes]
"""A command as sent: its name and arguments."""

_SUBSCRIBING = {b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"}


def _frame_end(buf: bytes | bytearray, pos: int) -> int | None:
    """Where the RESP value at ``pos`` ends, or ``None`` if ``buf`` does not hold all of it yet."""
    if pos >= len(buf):
        return None
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    kind = buf[pos : pos + 1]
    if kind in (b"$", b"!", b"="):  # bulk string, bulk error, verbatim string
        size = int(buf[pos + 1 : eol])
        stop = eol + 2 if size < 0 else eol + 2 + size + 2
        return stop if stop <= len(buf) else None
    if kind in (b"*", b"~", b">", b"%", b"|"):  # array, set, push, map, attribute
        count = int(buf[pos + 1 : eol])
        count = count * 2 if kind in (b"%", b"|") else count
        end: int | None = eol + 2
        for _ in range(max(0, count)):
            assert end is not None
            end = _frame_end(buf, end)
            if end is None:
                return None
        return end
    return eol + 2  # +simple, -error, :integer, _null, ,double, #boolean, (big number


def _command(frame: bytes) -> Command:
    """The bulk strings of a command's RESP array (or the words of an inline command)."""
    if not frame.startswith(b"*"):
        return frame.split()
    parts: Command = []
    pos = frame.index(b"\r\n") + 2
    while pos < len(frame):
        eol = frame.index(b"\r\n", pos)
        size = int(frame[pos + 1 : eol])
        parts.append(frame[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2
    return parts


@dataclass
class Swallow:
    """Lose the replies to the next ``times`` commands that ``matches``."""

    matches: Callable[[Command], bool]
    times: int = 1
    swallowed: list[Command] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)
    """Set once ``times`` replies were lost."""


class RedisProxy:
    """``running()`` yields a ``redis://`` URL that reaches ``upstream`` through the proxy;
    :meth:`swallow` arms it to lose replies."""

    def __init__(self, upstream: str) -> None:
        address = upstream.split("//", 1)[1].split("/", 1)[0]
        host, port = address.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._rules: list[Swallow] = []
        self.commands = 0

    def swallow(self, matches: Callable[[Command], bool], times: int = 1) -> Swallow:
        rule = Swallow(matches, times)
        self._rules.append(rule)
        return rule

    def _take(self, command: Command) -> Swallow | None:
        """The rule that loses this command's reply, if any (counted as it is sent)."""
        for rule in self._rules:
            if len(rule.swallowed) < rule.times and rule.matches(command):
                rule.swallowed.append(command)
                return rule
        return None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        async with serving_connections(self._handle) as port:
            yield f"redis://127.0.0.1:{port}/0"

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        try:
            upstream = await anyio.connect_tcp(*self._upstream)
        except OSError:
            await client.aclose()
            return
        sent: deque[Swallow | None] = deque()
        """One entry per command forwarded and not yet answered: the rule losing its reply."""
        state = {"raw": False}  # subscribed: replies no longer follow commands

        async def commands(tg: anyio.abc.TaskGroup) -> None:
            buf = bytearray()
            async for data in client:
                buf += data
                if state["raw"]:
                    await upstream.send(bytes(buf))
                    buf.clear()
                    continue
                pos = 0
                while (end := _frame_end(buf, pos)) is not None:
                    command = _command(bytes(buf[pos:end]))
                    self.commands += 1
                    pos = end
                    if command and command[0].upper() in _SUBSCRIBING:
                        state["raw"] = True  # what follows is copied as it is, both ways
                        pos = len(buf)
                        break
                    sent.append(self._take(command))
                await upstream.send(bytes(buf[:pos]))
                del buf[:pos]
            tg.cancel_scope.cancel()

        async def replies(tg: anyio.abc.TaskGroup) -> None:
            buf = bytearray()
            async for data in upstream:
                buf += data
                out = bytearray()
                pos = 0
                while not state["raw"] and sent and (end := _frame_end(buf, pos)) is not None:
                    rule = sent.popleft()
                    if rule is not None:  # ran, and its reply is lost with the connection
                        await client.send(bytes(out))
                        _reset(client)
                        if len(rule.swallowed) >= rule.times:
                            rule.done.set()
                        tg.cancel_scope.cancel()
                        return
                    out += buf[pos:end]
                    pos = end
                if state["raw"]:
                    out += buf[pos:]
                    pos = len(buf)
                del buf[:pos]
                if out:
                    await client.send(bytes(out))
            tg.cancel_scope.cancel()

        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
            async with client, upstream, anyio.create_task_group() as tg:
                tg.start_soon(commands, tg)
                tg.start_soon(replies, tg)


def _reset(stream: anyio.abc.SocketStream) -> None:
    """Make the coming close send RST: the client sees its connection drop, not a clean end."""
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
