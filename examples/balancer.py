"""A round-robin TCP load balancer, to try several workers on one machine:
``python -m examples.balancer --listen 8000 127.0.0.1:8001 127.0.0.1:8002 127.0.0.1:8003``.

Each client connection goes to the next worker that accepts it, with no stickiness at all: the
workers share sessions through Redis, so any of them serves any request. Use a real balancer
(nginx, HAProxy, a cloud load balancer) in production; the README shows an nginx configuration.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import anyio
import anyio.abc


class RoundRobin:
    """Opens each new connection to the next upstream that accepts it (a dead worker is skipped)."""

    def __init__(self, upstreams: Sequence[tuple[str, int]]) -> None:
        if not upstreams:
            raise ValueError("at least one upstream is needed")
        self.upstreams = list(upstreams)
        self._turn = 0

    async def connect(self) -> tuple[anyio.abc.SocketStream, int]:
        """A connection to the next upstream, and its port; OSError if none accepts."""
        for _ in self.upstreams:
            host, port = self.upstreams[self._turn % len(self.upstreams)]
            self._turn += 1
            try:
                return await anyio.connect_tcp(host, port), port
            except OSError:
                continue
        raise ConnectionRefusedError("no upstream accepts connections")

    async def handle(self, client: anyio.abc.SocketStream) -> None:
        try:
            upstream, _ = await self.connect()
        except OSError:
            await client.aclose()
            return
        await splice(client, upstream)


async def splice(client: anyio.abc.SocketStream, upstream: anyio.abc.SocketStream, first: bytes = b"") -> None:
    """Copy bytes both ways (after ``first``, already read from the client) until either side closes."""
    async with client, upstream, anyio.create_task_group() as tg:
        if first:
            await upstream.send(first)
        tg.start_soon(_pipe, client, upstream, tg.cancel_scope)
        tg.start_soon(_pipe, upstream, client, tg.cancel_scope)


async def _pipe(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
    try:
        async for data in source:
            await sink.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    finally:
        scope.cancel()


def _address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


async def serve(listen: tuple[str, int], upstreams: Sequence[tuple[str, int]]) -> None:
    balancer = RoundRobin(upstreams)
    listener = await anyio.create_tcp_listener(local_host=listen[0], local_port=listen[1])
    print(f"balancing {listen[0]}:{listen[1]} over", " ".join(f"{h}:{p}" for h, p in upstreams), flush=True)
    await listener.serve(balancer.handle)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 8000), help="[host:]port to listen on")
    parser.add_argument("upstreams", nargs="+", type=_address, help="host:port of each worker")
    args = parser.parse_args(argv)
    anyio.run(serve, args.listen, args.upstreams)


if __name__ == "__main__":
    main()
