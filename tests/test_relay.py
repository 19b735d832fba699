"""Relayed streams between two workers' buses in one process, against a real redis-server: a
claim and its place in line, chunks sent one per acknowledgement, the end, a claim given back,
and an owner nobody listens for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from mcp_sse_transport import SseConfig
from mcp_sse_transport.cluster import Bus, OwnerUnreachable, Relays
from mcp_sse_transport.cluster.connect import connect
from mcp_sse_transport.cluster.messages import Attach, Chunk, End

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"


@asynccontextmanager
async def _worker(url: str, prefix: str, owner_lease: float = 3.0) -> AsyncIterator[tuple[Bus, Relays]]:
    config = SseConfig(redis_url=url, redis_prefix=prefix, owner_lease=owner_lease, forward_timeout=2.0)
    redis, store = connect(config, None)
    try:
        bus = Bus(redis, store.redis, config)
        relays = Relays(bus, config)
        async with bus:
            yield bus, relays
    finally:
        await redis.aclose()
        await store.redis.aclose()


class WatchedLinks(dict[str, Any]):
    """A worker's links, telling when one is dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = anyio.Event()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self.dropped.set()


async def test_a_relayed_stream_sends_each_chunk_once_the_previous_one_was_acknowledged(
    redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _worker(redis_url, redis_prefix) as (owner, at_owner), _worker(redis_url, redis_prefix) as (_, here):
            claims: list[tuple[str, int]] = []
            served: list[tuple[Attach, tuple[int, int] | None]] = []
            sent: list[int] = []

            def on_claim(session_id: str, arrived: int) -> tuple[int, int] | None:
                claims.append((session_id, arrived))
                return (1, arrived)

            async def on_attach(attach: Attach) -> None:
                async with at_owner.link(attach) as (sink, _closed, claim):
                    served.append((attach, claim))
                    for n, chunk in enumerate((b"data: 1\n\n", b"data: 2\n\n"), 1):
                        await sink(chunk)  # returns once the relaying worker acknowledged it
                        sent.append(n)
                await at_owner.end_link(attach, True)

            at_owner.serve(on_claim, on_attach)
            async with here.relay(owner.worker_id, SESSION, arrived=5) as relay:
                await relay.attach("secret:3")
                first = await relay.messages.receive()
                assert first == Chunk(conn=relay.conn, seq=1, body=b"data: 1\n\n")
                assert sent == [], "the next chunk waits for the acknowledgement"
                await here.ack(relay, 1)
                assert await relay.messages.receive() == Chunk(conn=relay.conn, seq=2, body=b"data: 2\n\n")
                await here.ack(relay, 2)
                assert await relay.messages.receive() == End(conn=relay.conn, graceful=True)
            assert sent == [1, 2]
            assert claims == [(SESSION, 5)]
            [(attach, claim)] = served
            assert claim == (1, 5)
            assert (attach.session_id, attach.after, attach.arrived, attach.conn) == (
                SESSION,
                "secret:3",
                5,
                relay.conn,
            )


async def test_a_claim_never_attached_is_given_back_on_leaving(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(10):
        async with _worker(redis_url, redis_prefix) as (owner, at_owner), _worker(redis_url, redis_prefix) as (_, here):
            claimed = anyio.Event()

            def on_claim(session_id: str, arrived: int) -> tuple[int, int] | None:
                claimed.set()
                return None

            async def on_attach(attach: Attach) -> None:
                raise AssertionError("never attached")

            at_owner.serve(on_claim, on_attach)
            links = at_owner._links = WatchedLinks()
            async with here.relay(owner.worker_id, SESSION, arrived=1) as relay:
                await claimed.wait()
                assert relay.conn in links
            await links.dropped.wait()  # the relay's Detach gave the claim back
            assert not links


async def test_relaying_for_an_owner_nobody_listens_for_raises_owner_unreachable(
    redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(10):
        async with _worker(redis_url, redis_prefix, owner_lease=0.3) as (_, here):
            with pytest.raises(OwnerUnreachable):
                async with here.relay("gone-worker", SESSION, arrived=1):
                    raise AssertionError("not reached")
            assert not here._relays
