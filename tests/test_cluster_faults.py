"""Faults of the scale-out with a real redis-server and real worker processes: clocks that lie,
resumes that lose their race, a killed pub/sub connection, a directory that names a worker as
the owner of a session it no longer holds, and ``max_sessions`` under concurrency."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import anyio
import pytest
from redis.asyncio import Redis
from starlette.types import Message

from mcp_sse_transport import ErrorCode, SessionHandler
from mcp_sse_transport._asgi import stream_session
from mcp_sse_transport.cluster.resume import Resumes

from ._cluster import Worker, _options, _processes
from ._redis import RedisProcess
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, SseEvent, serving
from .test_resume import call_stream, open_session, start_session
from .test_scaleout import worker_app

pytestmark = pytest.mark.anyio

CLOCK_SKEWED_SERVER = """
import os, sys, time
real_time, offset = time.time, float(os.environ["MCP_SSE_TEST_CLOCK_OFFSET"])
time.time = lambda: real_time() + offset
from examples.server import main
main(sys.argv[1:])
"""
"""The example server with a wall clock ``$MCP_SSE_TEST_CLOCK_OFFSET`` seconds off."""


@asynccontextmanager
async def example_workers(
    redis_url: str, prefix: str, *specs: dict[str, Any], owner_lease: float = 1.5
) -> AsyncIterator[list[Worker]]:
    """One example server per spec: ``clock`` (seconds its wall clock is off), ``max_sessions``."""
    commands: list[tuple[list[str], dict[str, str] | None]] = []
    for spec in specs:
        options = [*_options(redis_url, prefix, owner_lease, 0.1), "--port", "{port}"]
        if "max_sessions" in spec:
            options += ["--max-sessions", str(spec["max_sessions"])]
        env = {"MCP_SSE_TEST_CLOCK_OFFSET": str(spec.get("clock", 0.0))}
        commands.append(([sys.executable, "-c", CLOCK_SKEWED_SERVER, *options], env))
    async with _processes(commands) as started:
        yield started


def echo(request_id: int | str, text: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}},
    }


def countdown(request_id: int, steps: int, interval: float) -> dict[str, Any]:
    arguments = {"steps": steps, "interval": interval}
    params = {"name": "countdown", "arguments": arguments, "_meta": {"progressToken": "p"}}
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


async def answer_to(raw: RawSseStream, request_id: int | str) -> dict[str, Any]:
    """Read the stream up to the answer to ``request_id``."""
    while True:
        event = await raw.next_event()
        assert event is not None, "the stream ended before the answer"
        if event.event == "message" and (body := event.json()).get("id") == request_id:
            assert isinstance(body, dict)
            return body


async def first_error(raw: RawSseStream) -> SseEvent | None:
    """The first ``event: error`` of a stream, or None if it ends without one."""
    while (event := await raw.next_event()) is not None:
        if event.event == "error":
            return event
    return None


async def ended_superseded(raw: RawSseStream) -> None:
    error = await first_error(raw)
    assert error is not None, "a refused or superseded resume got no event"
    assert error.json()["code"] == ErrorCode.SUPERSEDED
    assert await raw.next_event() is None and raw.ended, "then its stream ends, with its terminator"


# -- order without clocks ---------------------------------------------------------------------


async def test_a_worker_whose_clock_is_120_s_behind_still_serves_the_latest_resume(
    redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(60):
        async with example_workers(redis_url, redis_prefix, {}, {"clock": -120.0}) as (a, behind):
            async with httpx2.AsyncClient(base_url=a.url) as http, RawSseStream.open(a.url) as first:
                post_url, first_id = await open_session(first, http, retry_ms=100)
                # The first resume, on the owner; the later one on the worker whose clock says it
                # came two minutes earlier: by the clocks it lost, by arrival it won.
                async with RawSseStream.open(a.url, headers={"Last-Event-ID": first_id}) as earlier:
                    await ended_superseded(first)
                    async with RawSseStream.open(behind.url, headers={"Last-Event-ID": first_id}) as later:
                        await ended_superseded(earlier)
                        assert (await http.post(post_url, json=echo(1, "latest"))).status_code == 202
                        answer = await answer_to(later, 1)
                        assert answer["result"]["content"][0]["text"] == "latest"
                        # And the other way round: a later resume on the owner beats the skewed one.
                        async with RawSseStream.open(a.url, headers={"Last-Event-ID": first_id}) as last:
                            await ended_superseded(later)
                            assert (await http.post(post_url, json=echo(2, "last"))).status_code == 202
                            assert (await answer_to(last, 2))["result"]["content"][0]["text"] == "last"


async def test_a_clock_stepped_back_between_two_resumes_does_not_refuse_the_second(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one process (two workers on one Redis): the wall clock is stepped back 120 s between
    two resumes, on the owner and on the other worker; the second still wins."""
    import time

    with anyio.fail_after(30):
        async with serving(worker_app(redis_url, redis_prefix)) as a, serving(worker_app(redis_url, redis_prefix)) as b:
            async with httpx2.AsyncClient(base_url=a) as http, RawSseStream.open(a) as first:
                post_url, first_id = await open_session(first, http, retry_ms=50)
                for worker in (a, b):
                    async with RawSseStream.open(a, headers={"Last-Event-ID": first_id}) as earlier:
                        assert (await earlier.next_event()) is not None  # its endpoint: attached
                        real_time = time.time
                        monkeypatch.setattr(time, "time", lambda real_time=real_time: real_time() - 120)
                        async with RawSseStream.open(worker, headers={"Last-Event-ID": first_id}) as later:
                            await ended_superseded(earlier)
                            assert (await http.post(post_url, json=call_stream(1))).status_code == 202
                            assert (await answer_to(later, 1))["result"]["content"][0]["text"] == "streamed 1"
                        monkeypatch.undo()


async def test_a_resume_that_loses_its_race_gets_an_error_event_not_a_silent_close() -> None:
    """One process, no Redis: a resume whose claim is older than the newest is refused with
    ``SUPERSEDED``, and its stream ends with its terminator."""
    handler = SessionHandler(uuid4().hex)
    newest = handler.claim()  # a later resume took its place in line, and waits for its turn
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("not reached")

    with anyio.fail_after(10):
        await stream_session(handler, {"type": "http"}, receive, send, b"", after="0", arrived=newest[0] - 1)
    body = b"".join(message.get("body", b"") for message in sent)
    assert sent[0]["status"] == 200 and b"event: error" in body and str(int(ErrorCode.SUPERSEDED)).encode() in body
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert not handler.attached


async def test_a_relayed_resume_that_loses_its_race_gets_superseded_through_the_relay(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers in one process: a resume relayed by B draws its place in line, then the
    client's next resume reaches the owner A and attaches first; when B's asks to attach, A
    refuses it, and B's stream gets ``SUPERSEDED`` before it ends."""
    replaying, later_attached = anyio.Event(), anyio.Event()
    replay_here = Resumes._replay_here

    async def held_replay(self: Resumes, *args: Any) -> str | None:
        replaying.set()
        await later_attached.wait()
        return await replay_here(self, *args)

    monkeypatch.setattr(Resumes, "_replay_here", held_replay)
    with anyio.fail_after(30):
        async with serving(worker_app(redis_url, redis_prefix)) as a, serving(worker_app(redis_url, redis_prefix)) as b:
            async with httpx2.AsyncClient(base_url=a) as http, RawSseStream.open(a) as first:
                post_url, first_id = await open_session(first, http, retry_ms=50)
                async with RawSseStream.open(b, headers={"Last-Event-ID": first_id}) as relayed:
                    await replaying.wait()
                    async with RawSseStream.open(a, headers={"Last-Event-ID": first_id}) as own:
                        endpoint = await own.next_event()
                        assert endpoint is not None and endpoint.event == "endpoint"
                        await ended_superseded(first)
                        later_attached.set()
                        await ended_superseded(relayed)
                        assert (await http.post(post_url, json=call_stream(1))).status_code == 202
                        assert (await answer_to(own, 1))["result"]["content"][0]["text"] == "streamed 1"


# -- Redis faults stay local ------------------------------------------------------------------


async def _normal_client_ids(redis: Redis) -> set[int]:
    clients = await redis.client_list(_type="normal")
    return {int(client["id"]) for client in clients}


async def test_a_killed_pubsub_connection_fails_no_append_and_loses_no_post(
    redis_process: RedisProcess, redis_prefix: str
) -> None:
    steps = 400
    redis = Redis.from_url(redis_process.url)
    try:
        with anyio.fail_after(90):
            async with example_workers(redis_process.url, redis_prefix, {}, {}) as (a, b):
                async with httpx2.AsyncClient(base_url=b.url) as http, RawSseStream.open(a.url) as raw:
                    post_url = await start_session(raw, http, retry_ms=100)
                    assert (await http.post(post_url, json=countdown(1, steps, 0.005))).status_code == 202
                    progress: list[int] = []
                    while len(progress) < 20:  # the owner appends events all along
                        event = await raw.next_event()
                        assert event is not None and event.event == "message"
                        progress.append(event.json()["params"]["progress"])
                    before = await _normal_client_ids(redis)
                    killed = await redis.client_kill_filter(_type="pubsub")
                    assert killed == 2, "both workers' channels"
                    # Handed over from B to A while A subscribes again: each is delivered
                    # (202, then its answer), or refused (503); never accepted and lost.
                    statuses: dict[int, int] = {}

                    async def post(n: int) -> None:
                        statuses[n] = (await http.post(post_url, json=echo(100 + n, f"during {n}"))).status_code

                    async with anyio.create_task_group() as tg:
                        for n in range(10):
                            tg.start_soon(post, n)
                    delivered = sum(status == 202 for status in statuses.values())
                    answered, final = await _answers(raw, progress, lambda answers: len(answers) >= delivered)
                    answers = {request_id - 100: text for request_id, text in answered.items()}
                    after = await _normal_client_ids(redis)
    finally:
        await redis.aclose()
    assert set(statuses.values()) <= {202, 503}
    assert answers == {n: f"during {n}" for n, status in statuses.items() if status == 202}
    assert sum(status == 202 for status in statuses.values()) >= 1
    assert progress == list(range(1, steps + 1)), "every append succeeded: every event, once, in order"
    assert final["result"]["content"][0]["text"] == f"counted {steps} steps"
    assert before <= after, "only the subscriptions reconnected: no other connection was dropped"


async def test_a_channel_that_cannot_subscribe_again_for_a_while_loses_no_post_and_no_append(
    redis_process: RedisProcess, redis_prefix: str
) -> None:
    """The pub/sub connections killed while Redis refuses new connections (``maxclients``
    reached): the workers cannot subscribe again until it is lifted. Appends go on on their
    connections; POSTs handed over meanwhile get 503, never 202 and lost; afterwards they are
    delivered again."""
    steps = 600
    redis = Redis.from_url(redis_process.url)
    try:
        with anyio.fail_after(120):
            # A lease longer than Redis refuses connections for: renewals that need a connection
            # of their own fail meanwhile, and the session must not move for that.
            async with example_workers(redis_process.url, redis_prefix, {}, {}, owner_lease=10) as (a, b):
                async with httpx2.AsyncClient(base_url=b.url) as http, RawSseStream.open(a.url) as raw:
                    post_url = await start_session(raw, http, retry_ms=100)
                    # Every connection the workers need is open before Redis refuses new ones.
                    assert (await http.post(post_url, json=echo(2, "warm"))).status_code == 202
                    assert (await answer_to(raw, 2))["result"]["content"][0]["text"] == "warm"
                    assert (await http.post(post_url, json=countdown(1, steps, 0.01))).status_code == 202
                    progress: list[int] = []
                    while len(progress) < 20:
                        event = await raw.next_event()
                        assert event is not None and event.event == "message"
                        progress.append(event.json()["params"]["progress"])
                    (limit,) = (await redis.config_get("maxclients")).values()
                    connected = (await redis.info("clients"))["connected_clients"]
                    run_id = (await redis.info("server"))["run_id"]
                    await redis.config_set("maxclients", connected - 2)  # what is left once both are killed
                    try:
                        assert await redis.client_kill_filter(_type="pubsub") == 2
                        statuses: dict[int, int] = {}

                        async def post(n: int) -> None:
                            response = await http.post(post_url, json=echo(100 + n, f"during {n}"))
                            statuses[n] = response.status_code

                        async with anyio.create_task_group() as tg:
                            for n in range(3):
                                tg.start_soon(post, n)
                    finally:
                        await redis.config_set("maxclients", str(limit))
                    # Back: a POST is delivered again (a client sends one answered 503 again).
                    for _ in range(5):
                        status = (await http.post(post_url, json=echo(200, "after"))).status_code
                        assert status in (202, 503)
                        if status == 202:
                            break
                    assert status == 202, "delivered once the channels are back"
                    expected = {100 + n for n, status in statuses.items() if status == 202} | {200}
                    answers, final = await _answers(raw, progress, lambda answers: expected <= set(answers))
                    run_id_after = (await redis.info("server"))["run_id"]
    finally:
        await redis.aclose()
    assert run_id_after == run_id, "the same Redis throughout: it did not restart"
    # 503: not delivered; 504: the owner may have taken it (the client sends it again: it runs once).
    assert set(statuses.values()) <= {202, 503, 504}
    unknown = {100 + n for n, status in statuses.items() if status == 504}
    assert set(answers) <= expected | unknown
    assert progress == list(range(1, steps + 1)), "every append succeeded: every event, once, in order"
    assert final["result"]["content"][0]["text"] == f"counted {steps} steps"
    assert b"lost this worker's channel" in a.log and b"this worker's channel is" in a.log, "it was back"


async def _answers(
    raw: RawSseStream, progress: list[int], enough: Callable[[dict[int, str]], bool]
) -> tuple[dict[int, str], dict[str, Any]]:
    """Read the stream until the countdown call (id 1) has answered and ``enough`` holds of the
    other calls' answers (their texts by request id); progress goes to ``progress``."""
    answers: dict[int, str] = {}
    final: dict[str, Any] | None = None
    while final is None or not enough(answers):
        event = await raw.next_event()
        assert event is not None and event.event == "message", "no error event, no end"
        body = event.json()
        if body.get("method") == "notifications/progress":
            progress.append(body["params"]["progress"])
        elif body["id"] == 1:
            final = body
        else:
            answers[body["id"]] = body["result"]["content"][0]["text"]
    return answers, final


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _commands(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stat["calls"]) for stat in stats.values())


async def test_a_post_for_a_session_the_directory_wrongly_gives_this_worker_does_not_spin(
    redis_process: RedisProcess, redis_prefix: str
) -> None:
    """The directory names the worker as the owner of a session it does not hold (a lease left
    behind): a POST gives the stale lease up and takes the session over, in a few commands."""
    redis = Redis.from_url(redis_process.url)
    session_id, secret = uuid4().hex, uuid4().hex
    try:
        with anyio.fail_after(30):
            async with example_workers(redis_process.url, redis_prefix, {}, owner_lease=60) as (worker,):
                channels = await redis.pubsub_channels(f"{redis_prefix}worker:*")
                (channel,) = channels
                worker_id = _text(channel).rsplit(":", 1)[1]
                await redis.hset(f"{redis_prefix}{{{session_id}}}:meta", mapping={"fp": "", "rs": secret})
                await redis.set(f"{redis_prefix}{{{session_id}}}:owner", worker_id, px=60_000)
                before = await _commands(redis)
                async with httpx2.AsyncClient(base_url=worker.url) as http:
                    posted = await http.post(f"/messages/?session_id={session_id}", json=echo(1, "hi"))
                spent = await _commands(redis) - before
                owner = await redis.get(f"{redis_prefix}{{{session_id}}}:owner")
    finally:
        await redis.aclose()
    assert posted.status_code == 202, posted.text
    assert owner is not None and _text(owner) == worker_id, "taken over afresh"
    assert spent < 60, f"{spent} Redis commands for one POST"


# -- max_sessions, atomically, takeovers included ---------------------------------------------


async def test_concurrent_gets_never_overshoot_max_sessions(redis_url: str, redis_prefix: str) -> None:
    statuses: list[int] = []
    with anyio.fail_after(60):
        async with example_workers(redis_url, redis_prefix, {"max_sessions": 3}) as (worker,):
            done = anyio.Event()

            async def open_one() -> None:
                async with RawSseStream.open(worker.url) as raw:
                    statuses.append(raw.status)
                    if len(statuses) == 12:
                        done.set()
                    await done.wait()  # every stream stays open until all twelve were answered

            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(open_one)
    assert sorted(statuses) == [200] * 3 + [503] * 9


async def test_takeovers_count_against_max_sessions(redis_url: str, redis_prefix: str) -> None:
    """B may hold 2 sessions; A dies holding 3: concurrent POSTs for all three, through B, take
    two over and get 503 for the third; a resume of the third on B is told to retry."""
    with anyio.fail_after(60):
        async with example_workers(redis_url, redis_prefix, {}, {"max_sessions": 2}) as (a, b):
            async with httpx2.AsyncClient(base_url=b.url) as http:
                sessions: list[tuple[str, str]] = []
                async with (
                    RawSseStream.open(a.url) as s1,
                    RawSseStream.open(a.url) as s2,
                    RawSseStream.open(a.url) as s3,
                ):
                    for raw in (s1, s2, s3):
                        sessions.append(await open_session(raw, http, retry_ms=100))
                    a.process.send_signal(signal.SIGKILL)
                    assert await a.process.wait() == -signal.SIGKILL
                statuses: dict[int, int] = {}

                async def post(n: int) -> None:
                    response = await http.post(sessions[n][0], json=echo(1, "after"))
                    statuses[n] = response.status_code
                    if response.status_code == 503:
                        assert response.text == "Too many open sessions"

                async with anyio.create_task_group() as tg:
                    for n in range(3):
                        tg.start_soon(post, n)
                assert sorted(statuses.values()) == [202, 202, 503]
                (refused,) = (n for n, status in statuses.items() if status == 503)
                async with RawSseStream.open(b.url, headers={"Last-Event-ID": sessions[refused][1]}) as resumed:
                    error = await first_error(resumed)
                    assert error is not None and error.json()["code"] == ErrorCode.SERVER_SHUTDOWN
                    assert error.json()["message"] == "Too many open sessions" and error.retry is not None
