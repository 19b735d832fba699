"""A slow store is backpressure, not death: worker processes whose link to a real redis-server
stalls for seconds at a time, repeatedly, while a resuming client calls a streaming tool through
a round-robin balancer. No session is lost, every call is answered, every event once in order."""

from __future__ import annotations

import anyio
import pytest

from mcp_sse_transport.client import resumable_sse_client

from ._cluster import one_request_per_connection, workers
from ._redis import RedisProcess, StallingLink
from ._sdk_compat import Client
from ._support import CuttingProxy

pytestmark = pytest.mark.anyio

STALLS = 3
STALL_SECONDS = 4.0
"""Longer than the workers' Redis command timeout (``forward_timeout``, 3 s), so commands fail
and are tried again, not merely delayed; shorter than ``grant_timeout`` (10 s)."""


async def _countdown(client: Client, steps: int) -> int:
    """Call the countdown tool; check its progress arrived exactly once, in order."""
    received: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append(progress)

    await client.call_tool("countdown", {"steps": steps, "interval": 0.01}, progress_callback=on_progress)
    assert received == list(range(1, steps + 1)), "exactly once, in order"
    return steps


async def test_redis_stalls_shorter_than_grant_timeout_lose_no_session_and_no_call(redis_prefix: str) -> None:
    with RedisProcess() as redis, anyio.fail_after(180):
        link = StallingLink(redis.url)
        async with link.running() as url:
            # A lease longer than a stall: the owner keeps its sessions through one.
            async with workers(url, redis_prefix, count=2, owner_lease=10.0, retry=0.1) as started:
                balancer = CuttingProxy([worker.url for worker in started])
                async with balancer.running() as front:
                    sessions: list[str] = []
                    transport = resumable_sse_client(
                        f"{front}/sse",
                        httpx_client_factory=one_request_per_connection,
                        on_session_created=sessions.append,
                        max_reconnects=10,
                    )
                    async with Client(transport, mode="legacy") as client:
                        calls, events = 0, 0
                        stalling_done = anyio.Event()

                        async def stall_repeatedly() -> None:
                            for _ in range(STALLS):
                                await anyio.sleep(1.0)  # fault injection: when to stall, not a wait
                                async with link.stalled():
                                    await anyio.sleep(STALL_SECONDS)  # how long the link is stalled
                            stalling_done.set()

                        async with anyio.create_task_group() as tg:
                            tg.start_soon(stall_repeatedly)
                            while not stalling_done.is_set() or calls < 2:
                                events += await _countdown(client, 100)
                                calls += 1
    assert link.stalls == STALLS
    assert len(sessions) == 1, "the session was never lost"
    print(f"\nredis stalls: {STALLS} of {STALL_SECONDS:g} s, {calls} calls answered, {events} progress events")
