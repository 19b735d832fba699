"""Scale-out on Redis with real processes: three example servers on their own ports sharing one
Redis, behind a round-robin balancer, driven by the SDK's client and the resuming client."""

from __future__ import annotations

import random
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import pytest

from mcp_sse_transport import ErrorCode
from mcp_sse_transport.client import resumable_sse_client

from ._cluster import Worker, one_request_per_connection, uvicorn_cli, workers
from ._redis import RedisProcess
from ._sdk_compat import Client, MCPError, sse_client, types
from ._sdk_compat import httpx as httpx2
from ._support import CuttingProxy, RawSseStream, SseEvent
from .test_resume import start_session

pytestmark = pytest.mark.anyio


def _text(result: types.CallToolResult) -> str:
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return content.text


async def _countdown(client: Client, steps: int) -> list[float]:
    """Call the example's countdown tool; returns the progress it reported."""
    received: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append(progress)

    result = await client.call_tool("countdown", {"steps": steps}, progress_callback=on_progress)
    assert _text(result) == f"counted {steps} steps"
    return received


async def _countdown_with_cuts(client: Client, steps: int, proxy: CuttingProxy, cut_at: list[int]) -> list[float]:
    """``_countdown``, 2 ms a step, with the event stream cut once the progress count reaches each
    of ``cut_at`` (paced, so a cut finds the stream live rather than its events already read)."""
    received: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append(progress)
        if cut_at and len(received) == cut_at[0]:
            cut_at.pop(0)
            proxy.cut()

    result = await client.call_tool("countdown", {"steps": steps, "interval": 0.002}, progress_callback=on_progress)
    assert _text(result) == f"counted {steps} steps"
    return received


async def _interrupted_countdown(
    client: Client, interrupt: Callable[[], object], at: int = 1
) -> tuple[int, list[float]]:
    """Call a long countdown and ``interrupt`` once ``at`` progress notifications arrived; the call
    must fail: returns its error code and the progress received."""
    received: list[float] = []
    reached = anyio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        received.append(progress)
        if len(received) == at:
            reached.set()

    async def interrupt_when_reached() -> None:
        await reached.wait()
        interrupt()

    async with anyio.create_task_group() as tg:
        tg.start_soon(interrupt_when_reached)
        with pytest.raises(MCPError) as failed:
            await client.call_tool("countdown", {"steps": 100_000, "interval": 0.01}, progress_callback=on_progress)
    return failed.value.error.code, received


@dataclass
class Balanced:
    """Workers behind a round-robin balancer, and a client connected through it."""

    workers: list[Worker]
    proxy: CuttingProxy
    client: Client
    sessions: list[str]
    """The session id the client's transport reported (the resuming client only)."""

    def worker(self, port: int) -> Worker:
        return next(worker for worker in self.workers if worker.port == port)

    @property
    def owner(self) -> Worker:
        """The worker the session's first GET reached, which opened the session."""
        return self.worker(self.proxy.routed[0][1])


@asynccontextmanager
async def balanced(
    redis_url: str, prefix: str, count: int = 3, *, stock: bool = False, streams_only: bool = False, **options: float
) -> AsyncIterator[Balanced]:
    """``count`` workers behind the balancer, and an SDK ``Client`` through it on the resuming
    client (or, with ``stock``, the SDK's own ``sse_client``), every request on a new connection."""
    async with workers(redis_url, prefix, count, **options) as started:
        proxy = CuttingProxy([worker.url for worker in started], streams_only=streams_only)
        async with proxy.running() as balancer:
            sessions: list[str] = []
            url = f"{balancer}/sse"
            transport = (
                sse_client(url, httpx_client_factory=one_request_per_connection)
                if stock
                else resumable_sse_client(
                    url, httpx_client_factory=one_request_per_connection, on_session_created=sessions.append
                )
            )
            async with Client(transport, mode="legacy") as client:
                yield Balanced(started, proxy, client, sessions)


async def test_sdk_client_calls_posted_to_every_worker_are_all_answered_exactly_once(
    redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(120):
        async with balanced(redis_url, redis_prefix, stock=True) as cluster:
            for n in range(30):
                assert await _countdown(cluster.client, 10) == list(range(1, 11))
                assert _text(await cluster.client.call_tool("echo", {"text": f"call {n}"})) == f"call {n}"
    (first_get, _), *rest = cluster.proxy.routed
    assert first_get == "GET"
    posted_to = {port for method, port in rest if method == "POST"}
    assert posted_to == {worker.port for worker in cluster.workers}, "POSTs reached the owner and both others"


async def test_resuming_client_across_cut_streams_gets_every_event_once_in_order(
    redis_url: str, redis_prefix: str
) -> None:
    rng = random.Random(6)
    with anyio.fail_after(120):
        async with balanced(redis_url, redis_prefix, streams_only=True) as cluster:
            for _ in range(8):
                cut_at = sorted(rng.sample(range(1, 300), 3))
                assert await _countdown_with_cuts(cluster.client, 300, cluster.proxy, cut_at) == list(range(1, 301))
    gets = [port for method, port in cluster.proxy.routed if method == "GET"]
    owner, resumes = gets[0], gets[1:]
    # A cut can land while the client is still reading what arrived before it, or reconnecting
    # from the cut before: not every cut makes a resume.
    assert len(resumes) >= 12
    assert any(port != owner for port in resumes), "some resumes were relayed by another worker"
    assert owner in resumes, "and some were served by the owner itself"


async def test_worker_killed_mid_call_its_session_goes_on_elsewhere(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(120):
        async with balanced(redis_url, redis_prefix) as cluster:
            client, owner = cluster.client, cluster.owner
            assert _text(await client.call_tool("echo", {"text": "before"})) == "before"
            code, received = await _interrupted_countdown(client, lambda: owner.process.send_signal(signal.SIGKILL), 5)
            assert code == ErrorCode.REQUEST_INTERRUPTED
            assert received == list(range(1, len(received) + 1)), "what arrived came once, in order"
            # The same session goes on, on the other workers, without a new initialize.
            for n in range(5):
                assert _text(await client.call_tool("echo", {"text": f"after {n}"})) == f"after {n}"
            assert await _countdown(client, 20) == list(range(1, 21))
    assert await owner.process.wait() == -signal.SIGKILL
    later = cluster.proxy.routed[cluster.proxy.routed.index(("GET", owner.port)) + 1 :]
    assert later and all(port != owner.port for _, port in later[-5:])


def _token_order(event_id: str) -> tuple[int, int]:
    milliseconds, sequence = event_id.rsplit(":", 1)[1].split("-")
    return int(milliseconds), int(sequence)


async def test_takeover_replays_the_handshake_unseen_and_fails_only_the_unanswered_request(
    redis_url: str, redis_prefix: str
) -> None:
    """On the wire: the session's stream on worker A, its POSTs on worker B, A killed; the
    resume on B gets what A stored, an error for the call A never answered, no second
    initialize response, and the session answers the next call."""
    with anyio.fail_after(60):
        async with workers(redis_url, redis_prefix, count=2) as (a, b):
            async with httpx2.AsyncClient(base_url=b.url) as http:
                async with RawSseStream.open(a.url) as raw:
                    post_url = await start_session(raw, http, retry_ms=100)
                    countdown = {
                        "jsonrpc": "2.0",
                        "id": 1,
                        "method": "tools/call",
                        "params": {
                            "name": "countdown",
                            "arguments": {"steps": 1000, "interval": 0.01},
                            "_meta": {"progressToken": "p"},
                        },
                    }
                    assert (await http.post(post_url, json=countdown)).status_code == 202
                    events = [await raw.next_event() for _ in range(5)]
                    a.process.send_signal(signal.SIGKILL)
                    assert await a.process.wait() == -signal.SIGKILL
                seen = [event for event in events if event is not None]
                assert [event.json()["params"]["progress"] for event in seen] == [1, 2, 3, 4, 5]
                last_id = seen[-1].id
                assert last_id is not None
                # B answers for the session once A's lease has run out (a POST waits for that).
                echo = {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": "hi"}},
                }
                assert (await http.post(post_url, json=echo)).status_code == 202
                async with RawSseStream.open(b.url, headers={"Last-Event-ID": last_id}) as resumed:
                    endpoint = await resumed.next_event()
                    assert endpoint is not None and endpoint.event == "endpoint" and endpoint.data == post_url
                    messages: list[SseEvent] = []
                    while not messages or messages[-1].json().get("id") != 2:
                        event = await resumed.next_event()
                        assert event is not None and event.event == "message"
                        messages.append(event)
    ids = [last_id] + [event.id for event in messages if event.id is not None]
    assert len(ids) == len(messages) + 1 and ids == sorted(ids, key=_token_order) and len(set(ids)) == len(ids)
    bodies = [event.json() for event in messages]
    progress = [body["params"]["progress"] for body in bodies if body.get("method") == "notifications/progress"]
    assert progress == list(range(6, 6 + len(progress))), "A's stored events after the last id seen, once each"
    answers = [body for body in bodies if "id" in body]
    assert [answer["id"] for answer in answers] == [1, 2], "no response to the replayed initialize"
    assert answers[0]["error"]["code"] == ErrorCode.REQUEST_INTERRUPTED
    assert answers[1]["result"]["content"][0]["text"] == "hi"


async def test_redis_outage_fails_calls_fast_and_the_session_goes_on_after_a_restart(redis_prefix: str) -> None:
    with RedisProcess("--appendonly", "yes") as redis, anyio.fail_after(90):  # persisted, as in production
        async with balanced(redis.url, redis_prefix) as cluster:
            client = cluster.client
            assert _text(await client.call_tool("echo", {"text": "up"})) == "up"
            redis.stop()
            for _ in range(3):  # each POST lands on another worker: owner or not, the same
                with anyio.fail_after(10), pytest.raises(MCPError) as down:
                    await client.call_tool("echo", {"text": "down"})
                assert down.value.error.code == types.CONNECTION_CLOSED
            # A well-formed id: whether its secret is right, only Redis could tell.
            resume = {"Last-Event-ID": f"{cluster.sessions[0]}.{'0' * 32}:0"}
            async with httpx2.AsyncClient() as http:
                for worker in cluster.workers:  # a new session, or a resume on the owner or elsewhere
                    for headers in ({}, resume):
                        refused = await http.get(f"{worker.url}/sse", headers=headers)
                        assert refused.status_code == 503 and refused.text == "Session store unavailable"
                        assert refused.headers["retry-after"] == "1"
            redis.start()
            assert _text(await client.call_tool("echo", {"text": "back"})) == "back"
            assert await _countdown(client, 20) == list(range(1, 21))


async def test_sigterm_hands_the_session_to_another_worker_without_waiting_for_the_lease(
    redis_url: str, redis_prefix: str
) -> None:
    # A lease far longer than the test may take: only a handed-off session can move in time.
    with anyio.fail_after(30):
        async with balanced(redis_url, redis_prefix, owner_lease=600) as cluster:
            client, owner = cluster.client, cluster.owner
            assert _text(await client.call_tool("echo", {"text": "before"})) == "before"
            code, _ = await _interrupted_countdown(client, owner.process.terminate)
            assert code == ErrorCode.REQUEST_INTERRUPTED
            for n in range(3):
                assert _text(await client.call_tool("echo", {"text": f"after {n}"})) == f"after {n}"
            # uvicorn finishes its graceful shutdown, then re-raises the signal it captured.
            assert await owner.process.wait() == -signal.SIGTERM


async def test_redis_restarted_empty_ends_the_session_with_clear_errors(redis_prefix: str) -> None:
    with RedisProcess() as redis, anyio.fail_after(60):  # no persistence: a restart loses everything
        async with balanced(redis.url, redis_prefix, count=2) as cluster:
            assert _text(await cluster.client.call_tool("echo", {"text": "up"})) == "up"

            def restart_redis() -> None:
                redis.stop()
                redis.start()

            code, _ = await _interrupted_countdown(cluster.client, restart_redis)
            # The session ended with STORE_UNAVAILABLE (an event could not be stored, or the owner
            # found Redis no longer knows it), and the client's resume was refused.
            assert code == ErrorCode.RESUME_UNKNOWN


async def test_uvicorn_workers_on_one_port_share_sessions(redis_url: str, redis_prefix: str) -> None:
    """``uvicorn --workers 3``: the kernel hands each connection to any of the three processes."""
    with anyio.fail_after(60):
        async with uvicorn_cli(redis_url, redis_prefix, "--workers", "3") as server:
            transport = resumable_sse_client(f"{server.url}/sse", httpx_client_factory=one_request_per_connection)
            async with Client(transport, mode="legacy") as client:
                for n in range(20):
                    assert await _countdown(client, 5) == [1, 2, 3, 4, 5]
                    assert _text(await client.call_tool("echo", {"text": f"call {n}"})) == f"call {n}"
    assert server.log.count(b"cluster worker") == 3, "three workers joined"


async def test_a_forced_shutdown_hands_the_session_off_too(redis_url: str, redis_prefix: str) -> None:
    """uvicorn's own command line waits for streams to end, then cancels them: a session whose
    stream is cancelled is handed off, not forgotten (the lease, 600 s, is never waited out)."""
    with anyio.fail_after(60):
        async with (
            uvicorn_cli(redis_url, redis_prefix, "--timeout-graceful-shutdown", "1", owner_lease=600) as first,
            workers(redis_url, redis_prefix, count=1, owner_lease=600) as (second,),
        ):
            proxy = CuttingProxy([first.url, second.url])
            async with proxy.running() as balancer:
                transport = resumable_sse_client(f"{balancer}/sse", httpx_client_factory=one_request_per_connection)
                async with Client(transport, mode="legacy") as client:
                    assert _text(await client.call_tool("echo", {"text": "before"})) == "before"
                    assert proxy.routed[0] == ("GET", first.port)
                    first.process.terminate()
                    assert await first.process.wait() == -signal.SIGTERM  # re-raised after its shutdown
                    for n in range(3):  # every connection now reaches the second worker
                        assert _text(await client.call_tool("echo", {"text": f"after {n}"})) == f"after {n}"
