"""Bounded soaks: about a minute of constant churn against one server, then flat memory and no
session, replay log or task left behind; and a minute across three worker processes on Redis,
two of them killed. Excluded from the default run: ``pytest -m soak``."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio
import pytest

from mcp_sse_transport import ErrorCode, SseConfig, sse_app
from mcp_sse_transport.client import resumable_sse_client

from ._cluster import Worker, one_request_per_connection, workers
from ._sdk_compat import Client, MCPError, ProgressFnT
from ._sdk_compat import httpx as httpx2
from ._support import CuttingProxy, RawSseStream, serving
from .test_faults import fault_server
from .test_integration import OPEN, initialize

pytestmark = [pytest.mark.anyio, pytest.mark.soak]

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))


@dataclass
class Churn:
    """What the soaks share: clients that keep calling, new sessions again and again, through a
    proxy that keeps cutting their streams, until ``deadline``."""

    proxy: CuttingProxy
    rng: random.Random
    counts: dict[str, int]
    deadline: float

    async def calling_client(
        self,
        url: str,
        call: Callable[[Client, list[float], ProgressFnT], Awaitable[None]],
        **options: Any,
    ) -> None:
        """A resuming client making one to five ``call``s per session; ``call`` gets the list its
        progress callback fills, cleared before each call."""
        received: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            received.append(progress)

        while anyio.current_time() < self.deadline:
            exit_stack = AsyncExitStack()
            try:
                client = await exit_stack.enter_async_context(
                    Client(resumable_sse_client(url, **options), mode="legacy")
                )
            except httpx2.HTTPError:  # cut while connecting: the client reports it, as it should
                self.counts["failed connects"] += 1
                continue
            async with exit_stack:
                for _ in range(self.rng.randint(1, 5)):
                    received.clear()
                    await call(client, received, on_progress)

    async def cutter(self) -> None:
        while anyio.current_time() < self.deadline:
            await anyio.sleep(self.rng.uniform(0.05, 0.3))  # load generation: when to cut, not a wait
            self.proxy.cut()
            self.counts["cuts"] += 1


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def test_a_minute_of_churn_leaves_memory_flat_and_nothing_behind() -> None:
    config = SseConfig(session_grace=2, retry_interval=0.05)
    app = sse_app(fault_server(), transport_security=OPEN, config=config)
    transport = app.state.sse_transport
    rng = random.Random(7)
    counts = {"raw sessions": 0, "calls": 0, "cuts": 0, "events": 0, "failed connects": 0}
    samples: list[int] = []
    tasks_at_start = asyncio.all_tasks()
    with anyio.fail_after(SOAK_SECONDS * 3 + 60):
        async with serving(app) as base:
            proxy = CuttingProxy(base, streams_only=True)
            async with proxy.running() as proxied, httpx2.AsyncClient(base_url=base) as http:
                deadline = anyio.current_time() + SOAK_SECONDS

                async def raw_churn() -> None:
                    while anyio.current_time() < deadline:
                        async with RawSseStream.open(base) as raw:
                            await initialize(raw, http)
                            counts["raw sessions"] += 1

                async def call(client: Client, received: list[float], on_progress: ProgressFnT) -> None:
                    steps = rng.randint(1, 300)
                    await client.call_tool("stream", {"count": steps}, progress_callback=on_progress)
                    assert received == list(range(1, steps + 1)), "exactly once, in order"
                    counts["calls"] += 1
                    counts["events"] += steps

                churn = Churn(proxy, rng, counts, deadline)
                calling_client = partial(churn.calling_client, f"{proxied}/sse", call)

                async def sampler() -> None:
                    while anyio.current_time() < deadline:
                        samples.append(rss_kib())
                        await anyio.sleep(1)  # load generation: the sampling period

                async with anyio.create_task_group() as tg:
                    for task in (raw_churn, raw_churn, calling_client, calling_client, churn.cutter, sampler):
                        tg.start_soon(task)
            # Every session ends within its grace period once its clients are gone.
            for _, session in list(transport._host.sessions.items()):
                await session.handler.linger()
            assert transport.statistics().open_sessions == 0
    # The server has stopped, so every session's own task has finished its clean-up.
    assert len(transport._backplane.store) == 0, "no replay log left behind"
    tasks_left = asyncio.all_tasks() - tasks_at_start
    warm = samples[len(samples) // 4 :]
    assert len(warm) >= 10, "too short to judge memory: run the soak for at least 15 s"
    growth = sum(warm[-5:]) / 5 - sum(warm[:5]) / 5
    print(f"\nsoak: {counts}, RSS samples (KiB) first {warm[:3]} last {warm[-3:]}, growth {growth:.0f} KiB")
    assert counts["calls"] > 0 and counts["cuts"] > 0 and counts["raw sessions"] > 0
    assert growth < 8 * 1024, "memory stays flat after warm-up (under 8 MiB drift)"
    assert not tasks_left, tasks_left


def _complaints(started: list[Worker]) -> list[str]:
    """The workers' warnings and errors, for a failure's message."""
    lines = (line for worker in started for line in worker.log.decode(errors="replace").splitlines())
    return [line for line in lines if "WARNING" in line or "ERROR" in line][-30:]


async def test_a_minute_of_churn_across_three_workers_two_of_them_killed(redis_url: str, redis_prefix: str) -> None:
    """Three worker processes behind the balancer; streams cut every 50 to 300 ms; a worker
    killed with SIGKILL at a third and at two thirds of the run, and one frozen (SIGSTOP) past
    its leases at a sixth and at a half, then thawed (SIGCONT): its sessions are taken over, and
    it must not write to them again. Every call is answered with each progress notification
    once and in order, or, if its worker died or froze, fails with ``REQUEST_INTERRUPTED`` after
    a gapless prefix; nothing hangs."""
    rng = random.Random(11)
    counts = {"calls": 0, "interrupted": 0, "events": 0, "cuts": 0, "kills": 0, "freezes": 0, "failed connects": 0}
    with anyio.fail_after(SOAK_SECONDS * 3 + 60):
        async with workers(redis_url, redis_prefix, owner_lease=1.0) as started:
            proxy = CuttingProxy([worker.url for worker in started], streams_only=True)
            async with proxy.running() as balancer:
                deadline = anyio.current_time() + SOAK_SECONDS

                async def call(client: Client, received: list[float], on_progress: ProgressFnT) -> None:
                    steps = rng.randint(1, 200)
                    arguments = {"steps": steps, "interval": 0.001}
                    code = None
                    try:
                        await client.call_tool("countdown", arguments, progress_callback=on_progress)
                    except MCPError as error:
                        code = error.error.code
                    if code is None:
                        assert received == list(range(1, steps + 1)), "exactly once, in order"
                        counts["calls"] += 1
                    else:
                        assert code == ErrorCode.REQUEST_INTERRUPTED, (code, _complaints(started))
                        assert received == list(range(1, len(received) + 1)), "a gapless prefix"
                        counts["interrupted"] += 1
                    counts["events"] += len(received)

                churn = Churn(proxy, rng, counts, deadline)
                calling_client = partial(
                    churn.calling_client, f"{balancer}/sse", call, httpx_client_factory=one_request_per_connection
                )

                async def killer() -> None:
                    for _ in range(2):
                        await anyio.sleep(SOAK_SECONDS / 3)  # load generation: when to kill, not a wait
                        victim = rng.choice([worker for worker in started if worker.process.returncode is None])
                        victim.process.send_signal(signal.SIGKILL)
                        await victim.process.wait()
                        counts["kills"] += 1

                async def freezer() -> None:
                    await anyio.sleep(SOAK_SECONDS / 6)  # fault injection: when to freeze, not a wait
                    for _ in range(2):
                        alive = [worker for worker in started if worker.process.returncode is None]
                        victim = rng.choice(alive)
                        victim.process.send_signal(signal.SIGSTOP)
                        await anyio.sleep(2.5)  # frozen past its 1 s leases: others take its sessions
                        victim.process.send_signal(signal.SIGCONT)
                        counts["freezes"] += 1
                        await anyio.sleep(SOAK_SECONDS / 3 - 2.5)

                async with anyio.create_task_group() as tg:
                    for task in (calling_client, calling_client, churn.cutter, killer, freezer):
                        tg.start_soon(task)
    print(f"\ncluster soak: {counts}")
    assert counts["kills"] == 2 and counts["freezes"] == 2 and counts["cuts"] > 0 and counts["calls"] > 0
    faults = counts["kills"] + counts["freezes"]
    assert counts["interrupted"] <= 2 * faults, "only calls in flight on a killed or frozen worker"
