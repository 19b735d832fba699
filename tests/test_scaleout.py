"""Scale-out on Redis, in one process: two transports sharing one Redis, each on its own real
uvicorn, so a test can see both sides (what Redis holds, what each worker does)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

import anyio
import pytest
from redis.asyncio import Redis
from starlette.applications import Starlette

from mcp_sse_transport import ErrorCode, InMemoryEventStore, SseConfig, SseServerTransport, sse_app

from ._redis import deletion_of
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, serving
from .test_resume import OPEN, _UserFromHeader, call_stream, open_session, start_session, stream_runs, streaming_server

pytestmark = pytest.mark.anyio


def worker_app(redis_url: str, prefix: str, **overrides: Any) -> Starlette:
    config = SseConfig(redis_url=redis_url, redis_prefix=prefix, owner_lease=1.0, retry_interval=0.05, **overrides)
    app = sse_app(streaming_server(), transport_security=OPEN, config=config)
    app.add_middleware(_UserFromHeader)
    return app


@asynccontextmanager
async def two_workers(redis_url: str, prefix: str, **overrides: Any) -> AsyncIterator[tuple[str, str]]:
    async with (
        serving(worker_app(redis_url, prefix, **overrides)) as a,
        serving(worker_app(redis_url, prefix, **overrides)) as b,
    ):
        yield a, b


def test_redis_url_needs_a_url_the_server_and_a_redis_store() -> None:
    with pytest.raises(ValueError, match="redis_url must be a URL"):
        SseConfig(redis_url="localhost:6379")
    config = SseConfig(redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="needs server"):
        SseServerTransport("/messages/", config=config)
    with pytest.raises(ValueError, match="RedisEventStore"):
        SseServerTransport("/messages/", config=config, event_store=InMemoryEventStore(), server=streaming_server())


async def test_a_transport_not_entered_refuses_requests_loudly() -> None:
    transport = SseServerTransport(
        "/messages/", config=SseConfig(redis_url="redis://127.0.0.1:1/0"), server=streaming_server()
    )

    async def receive() -> dict[str, Any]:
        raise AssertionError("not reached")

    async def send(message: Any) -> None:
        raise AssertionError("not reached")

    with pytest.raises(RuntimeError, match="async with"):
        await transport.handle_post_message({"type": "http", "method": "POST"}, receive, send)


async def test_another_credential_finds_no_session_on_any_worker(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(30):
        async with two_workers(redis_url, redis_prefix) as (a, b):
            alice = {"x-user": "alice"}
            async with httpx2.AsyncClient(base_url=b, headers=alice) as http:
                async with RawSseStream.open(a, headers=alice) as raw:
                    post_url, first_id = await open_session(raw, http, retry_ms=50)
                    bob = {"x-user": "bob"}
                    posted = await http.post(post_url, json=call_stream(1), headers=bob)
                    assert posted.status_code == 404 and posted.text == "Could not find session"
                    async with RawSseStream.open(b, headers={**bob, "Last-Event-ID": first_id}) as other:
                        refused = await other.next_event()
                        assert refused is not None and refused.event == "error"
                        assert refused.json()["code"] == ErrorCode.RESUME_UNKNOWN
                        fresh = await other.next_event()
                        assert fresh is not None and fresh.event == "endpoint" and fresh.data != post_url
                    # Alice's own POST through the other worker reaches her session.
                    assert (await http.post(post_url, json=call_stream(3))).status_code == 202
                    bodies = [(await raw.next_event()) for _ in range(4)]
                    assert [event.json().get("id") for event in bodies if event is not None][-1] == 1


async def test_a_malformed_post_to_another_worker_is_reported_on_the_stream(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(30):
        async with two_workers(redis_url, redis_prefix) as (a, b):
            async with httpx2.AsyncClient(base_url=b) as http, RawSseStream.open(a) as raw:
                post_url = await start_session(raw, http, retry_ms=50)
                posted = await http.post(post_url, json={"jsonrpc": "2.0", "id": 7, "method": 5})
                assert posted.status_code == 400 and posted.text == "Could not parse message"
                error = await raw.next_event()
                assert error is not None and error.event == "error"
                assert error.json() == {
                    "code": ErrorCode.PARSE_ERROR,
                    "message": "Could not parse message",
                    "data": {"id": 7},
                }
                answer = await raw.next_event()
                assert answer is not None and answer.json()["error"]["code"] == ErrorCode.INVALID_REQUEST


async def test_an_ended_session_leaves_nothing_in_redis(redis_url: str, redis_prefix: str, redis_client: Redis) -> None:
    async def keys() -> list[bytes]:
        return [key async for key in redis_client.scan_iter(match=f"{redis_prefix}*")]

    with anyio.fail_after(30):
        async with two_workers(redis_url, redis_prefix, session_grace=0) as (a, b), AsyncExitStack() as stack:
            async with httpx2.AsyncClient(base_url=b) as http:
                async with RawSseStream.open(a) as raw:
                    post_url = await start_session(raw, http, retry_ms=50)
                    assert (await http.post(post_url, json=call_stream(5))).status_code == 202
                    for _ in range(6):
                        assert await raw.next_event() is not None
                    session = post_url[-32:]
                    names = sorted(key.decode().rsplit(":", 1)[1] for key in await keys())
                    assert names == ["events", "meta", "owner", "seen"], "the call was answered: nothing pending"
                    assert all(session in key.decode() for key in await keys())
                    forgotten = await stack.enter_async_context(
                        deletion_of(redis_client, f"{redis_prefix}{{{session}}}:meta")
                    )
                await forgotten.wait()  # the stream closed, without grace: the session ends
                assert not await keys(), "one script deletes every key of it"
                assert (await http.post(post_url, json=call_stream(1))).status_code == 404


async def test_the_last_resume_wins_across_workers(redis_url: str, redis_prefix: str) -> None:
    with anyio.fail_after(30):
        async with two_workers(redis_url, redis_prefix) as (a, b):
            async with httpx2.AsyncClient(base_url=a) as http:
                async with RawSseStream.open(a) as first:
                    post_url = await start_session(first, http, retry_ms=50)
                    assert (await http.post(post_url, json=call_stream(2))).status_code == 202
                    seen = [await first.next_event() for _ in range(3)]
                    last_id = seen[-1].id if seen[-1] is not None else None
                    assert last_id is not None
                async with RawSseStream.open(b, headers={"Last-Event-ID": last_id}) as relayed:
                    endpoint = await relayed.next_event()
                    assert endpoint is not None and endpoint.data == post_url
                    async with RawSseStream.open(a, headers={"Last-Event-ID": last_id}) as own:
                        assert (await own.next_event()) is not None
                        superseded = await relayed.next_event()
                        assert superseded is not None and superseded.event == "error"
                        assert superseded.json()["code"] == ErrorCode.SUPERSEDED
                        assert await relayed.next_event() is None and relayed.ended
                        assert (await http.post(post_url, json={**call_stream(1), "id": 2})).status_code == 202
                        answer = await own.next_event()
                        assert answer is not None and answer.json()["method"] == "notifications/progress"


async def test_live_events_reach_a_stream_relayed_by_another_worker(redis_url: str, redis_prefix: str) -> None:
    count = 2000
    with anyio.fail_after(30):
        async with two_workers(redis_url, redis_prefix, replay_max_events=count * 2) as (a, b):
            async with httpx2.AsyncClient(base_url=a) as http:
                async with RawSseStream.open(a) as first:
                    post_url, first_id = await open_session(first, http, retry_ms=50)
                    last_id = None
                async with RawSseStream.open(b, headers={"Last-Event-ID": first_id}) as relayed:
                    assert (await relayed.next_event()) is not None  # endpoint
                    replayed = await relayed.next_event()  # from the start: the initialize response
                    assert replayed is not None and replayed.json()["id"] == 0
                    assert (await http.post(post_url, json=call_stream(count))).status_code == 202
                    progress = []
                    while True:
                        event = await relayed.next_event()
                        assert event is not None and event.event == "message" and event.id is not None
                        body = event.json()
                        if "id" in body:
                            break
                        progress.append(body["params"]["progress"])
                        last_id = event.id
    assert progress == list(range(1, count + 1))
    assert json.loads(json.dumps(body))["result"]["content"][0]["text"] == f"streamed {count}"
    assert last_id is not None


async def test_a_request_posted_to_two_workers_runs_once(redis_url: str, redis_prefix: str) -> None:
    async def next_answer(raw: RawSseStream) -> dict[str, Any]:
        while True:
            event = await raw.next_event()
            assert event is not None
            if "id" in (body := event.json()):
                return cast(dict[str, Any], body)

    with anyio.fail_after(30):
        async with two_workers(redis_url, redis_prefix) as (a, b):
            async with httpx2.AsyncClient(base_url=a) as http, RawSseStream.open(a) as raw:
                post_url = await start_session(raw, http, retry_ms=50)
                runs = len(stream_runs)
                for worker in (a, b, a):  # as a client sends a POST again whose answer it lost
                    assert (await http.post(f"{worker}{post_url}", json=call_stream(2))).status_code == 202
                first = await next_answer(raw)
                # A later request still runs: the session goes on.
                assert (await http.post(f"{b}{post_url}", json={**call_stream(1), "id": 9})).status_code == 202
                later = await next_answer(raw)
    assert first["id"] == 1 and later["id"] == 9, "one answer each"
    assert stream_runs[runs:] == [2, 1], "the request sent three times ran once"


async def test_a_session_redis_no_longer_knows_ends_with_store_unavailable(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    """Redis lost the session (its entry deleted, Redis itself up): the owner's next renewal
    finds out, and the client's stream ends with ``STORE_UNAVAILABLE``, not as if another worker
    had taken the session over."""
    with anyio.fail_after(30):
        async with serving(worker_app(redis_url, redis_prefix)) as base:
            async with httpx2.AsyncClient(base_url=base) as http, RawSseStream.open(base) as raw:
                post_url = await start_session(raw, http, retry_ms=50)
                session_id = post_url.split("session_id=")[1]
                assert await redis_client.delete(f"{redis_prefix}{{{session_id}}}:meta") == 1
                events = []
                while (event := await raw.next_event()) is not None:
                    events.append(event)
    errors = [event.json() for event in events if event.event == "error"]
    assert [error["code"] for error in errors] == [ErrorCode.STORE_UNAVAILABLE]
    assert errors[0]["message"] == "Session state was lost from Redis; the session ends"
