"""Exactly-once requests and bounded Redis state, with real worker processes, a real Redis, and
a proxy between them that loses the reply to one Redis command at a time (the command ran; the
worker cannot tell).

A POST answered 503 or 504 is sent again, as a client does: whichever step of the POST lost its
reply, the request is delivered once and answered once. Cancelled requests leave no unanswered
ids in Redis, and a takeover answers every unanswered request, however many, without ending the
session.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from mcp_sse_transport import ErrorCode, SseConfig, SseServerTransport
from mcp_sse_transport.cluster import RedisBackplane
from mcp_sse_transport.cluster.messages import Claim

from ._cluster import workers
from ._redis_proxy import Command, RedisProxy
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, SseEvent, serving
from .test_relay import WatchedLinks
from .test_resume import hang_entered, open_session, start_session, streaming_server
from .test_scaleout import worker_app

pytestmark = pytest.mark.anyio


def _echo(request_id: int, text: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}},
    }


def _hold(request_id: int) -> dict[str, Any]:
    """A call that runs for ten minutes, sending nothing meanwhile (no progress token)."""
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": "countdown", "arguments": {"steps": 1, "interval": 600}},
    }


def _cancel(request_id: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": request_id}}


async def _post_until_accepted(http: httpx2.AsyncClient, url: str, body: dict[str, Any]) -> list[int]:
    """POST ``body`` until it is answered 202, sending it again after a 503 (not delivered) or a
    504 (outcome unknown), as a client does; returns every status."""
    statuses: list[int] = []
    while not statuses or statuses[-1] != 202:
        assert len(statuses) < 10, statuses
        response = await http.post(url, json=body)
        assert response.status_code in (202, 503, 504), (response.status_code, response.text)
        statuses.append(response.status_code)
    return statuses


def _session_command(session_id: str, name: bytes, key: str, payload: bytes | None = None) -> Callable[[Command], bool]:
    """A matcher of one kind of command of the session: ``name`` on its ``key`` (as the first
    key, for scripts), or a ``PUBLISH`` whose payload holds ``payload``."""
    suffix = f"{{{session_id}}}:{key}".encode()

    def matches(command: Command) -> bool:
        if not command or command[0].upper() != name:
            return False
        if name == b"PUBLISH":
            return payload is not None and len(command) > 2 and payload in command[2]
        if name == b"EVALSHA":
            return len(command) > 3 and command[3].endswith(suffix)
        return len(command) > 1 and command[1].endswith(suffix)

    return matches


_STEPS: list[tuple[str, bytes, str, bytes | None, bool, tuple[int, ...]]] = [
    # (step, command, key, PUBLISH payload, POSTed to another worker than the owner, replies
    # lost in a row: twice defeats redis-py's own retry of an idempotent command, and a
    # handover sent again; what is sent once per POST can lose one reply only)
    ("lookup", b"HGETALL", "meta", None, True, (1, 2)),
    ("handover", b"PUBLISH", "", b'"t":"post"', True, (1, 2)),
    ("accept, handed over", b"EVALSHA", "seen", None, True, (1, 2)),
    ("answer to the handover", b"PUBLISH", "", b'"t":"posted"', True, (1,)),
    ("accept", b"EVALSHA", "seen", None, False, (1, 2)),
    ("store the response", b"EVALSHA", "events", None, False, (1,)),
    ("strike off the answered", b"EVALSHA", "pending", None, False, (1, 2)),
]


async def _message_with_id(raw: RawSseStream, request_id: int, seen: dict[int, list[SseEvent]]) -> SseEvent:
    """Read the stream until the answer to ``request_id``, noting every answer read on the way."""
    while True:
        event = await raw.next_event()
        assert event is not None, "the stream ended"
        if event.event != "message":
            continue
        body = event.json()
        if "id" in body and "method" not in body:
            seen.setdefault(body["id"], []).append(event)
            if body["id"] == request_id:
                return event


async def test_a_reply_lost_at_any_step_of_a_post_never_loses_the_request_nor_runs_it_twice(
    redis_url: str, redis_prefix: str
) -> None:
    proxy = RedisProxy(redis_url)
    answers: dict[int, list[SseEvent]] = {}
    outcomes: dict[str, list[int]] = {}
    with anyio.fail_after(120):
        async with proxy.running() as proxied, workers(proxied, redis_prefix, count=2) as (owner, other):
            async with httpx2.AsyncClient(base_url=owner.url) as http, RawSseStream.open(owner.url) as raw:
                post_path, _ = await open_session(raw, http, retry_ms=100)
                session_id = post_path.rsplit("=", 1)[1]
                request_id = 0
                for step, name, key, payload, handed_over, lost in _STEPS:
                    for times in lost:
                        request_id += 1
                        rule = proxy.swallow(_session_command(session_id, name, key, payload), times)
                        url = (other if handed_over else owner).url + post_path
                        statuses = await _post_until_accepted(http, url, _echo(request_id, f"{step} {times}"))
                        answer = await _message_with_id(raw, request_id, answers)
                        assert answer.json()["result"]["content"][0]["text"] == f"{step} {times}"
                        await rule.done.wait()  # the reply was lost, as planned
                        outcomes[f"{step} x{times}"] = statuses
                request_id += 1  # after them all, on a clean path: every earlier answer came before
                assert await _post_until_accepted(http, owner.url + post_path, _echo(request_id, "last")) == [202]
                await _message_with_id(raw, request_id, answers)
    assert {rid: len(events) for rid, events in answers.items()} == {rid: 1 for rid in range(1, request_id + 1)}
    # Some steps cost the POST a 503 or 504, sent again; every one was answered 202 in the end.
    assert any(len(statuses) > 1 for statuses in outcomes.values()), outcomes
    assert outcomes["handover x1"][0] == 504, "the owner may have taken it: the outcome is unknown"


async def test_a_thousand_cancelled_requests_leave_no_unanswered_ids_in_redis(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    count = 1000
    with anyio.fail_after(120):
        async with workers(redis_url, redis_prefix, count=1) as (worker,):
            async with httpx2.AsyncClient(base_url=worker.url) as http, RawSseStream.open(worker.url) as raw:
                post_path, _ = await open_session(raw, http, retry_ms=100)
                session_id = post_path.rsplit("=", 1)[1]
                pending = f"{redis_prefix}{{{session_id}}}:pending"
                limit = anyio.Semaphore(16)

                async def post(body: dict[str, Any]) -> None:
                    async with limit:
                        assert (await http.post(post_path, json=body)).status_code == 202

                async with anyio.create_task_group() as tg:
                    for n in range(1, count + 1):
                        tg.start_soon(post, _hold(n))
                assert await redis_client.scard(pending) == count
                async with anyio.create_task_group() as tg:
                    for n in range(1, count + 1):
                        tg.start_soon(post, _cancel(n))
                # A cancel strikes its request off before its POST is answered.
                assert await redis_client.scard(pending) == 0
                seen = await redis_client.hlen(f"{redis_prefix}{{{session_id}}}:seen")
                assert seen == count + 1, "the initialize and every call, each once"
                # The session goes on.
                assert (await http.post(post_path, json=_echo(count + 1, "still here"))).status_code == 202
                answer = await _message_with_id(raw, count + 1, {})
                assert answer.json()["result"]["content"][0]["text"] == "still here"


async def test_a_takeover_answers_two_thousand_unanswered_requests_and_keeps_the_session(
    redis_url: str, redis_prefix: str
) -> None:
    count = 2000  # the pending bound (replay_max_events), twice the buffer (max_buffered_events)
    with anyio.fail_after(120):
        async with workers(redis_url, redis_prefix, count=2) as (owner, heir):
            async with httpx2.AsyncClient(base_url=owner.url) as http:
                async with RawSseStream.open(owner.url) as raw:
                    post_path, resume_from = await open_session(raw, http, retry_ms=100)
                    limit = anyio.Semaphore(16)

                    async def post(body: dict[str, Any]) -> None:
                        async with limit:
                            assert (await http.post(owner.url + post_path, json=body)).status_code == 202

                    async with anyio.create_task_group() as tg:
                        for n in range(1, count + 1):
                            tg.start_soon(post, _hold(n))
                    # One more is refused, not delivered: the session holds as many as it may.
                    refused = await http.post(owner.url + post_path, json=_hold(count + 1))
                    assert refused.status_code == 503 and refused.text == "Too many requests in flight"
                    owner.process.send_signal(signal.SIGKILL)
                    assert await owner.process.wait() == -signal.SIGKILL
                # From before the first event: the log keeps the newest 2,000 (the answers).
                async with RawSseStream.open(heir.url, headers={"Last-Event-ID": resume_from}) as resumed:
                    endpoint = await resumed.next_event()
                    assert endpoint is not None and endpoint.event == "endpoint"
                    interrupted: set[int] = set()
                    while len(interrupted) < count:
                        event = await resumed.next_event()
                        assert event is not None, f"the stream ended after {len(interrupted)} answers"
                        if event.event != "message":
                            continue
                        body = event.json()
                        assert body["error"]["code"] == ErrorCode.REQUEST_INTERRUPTED
                        interrupted.add(body["id"])
                    assert interrupted == set(range(1, count + 1))
                    # The session goes on, on the heir, answering a new call.
                    assert (await http.post(heir.url + post_path, json=_echo(count + 2, "after"))).status_code == 202
                    answer = await _message_with_id(resumed, count + 2, {})
                    assert answer.json()["result"]["content"][0]["text"] == "after"


async def test_a_claim_whose_relaying_worker_died_before_attaching_is_dropped(
    redis_url: str, redis_prefix: str
) -> None:
    config = SseConfig(redis_url=redis_url, redis_prefix=redis_prefix, owner_lease=0.3)
    transport = SseServerTransport("/messages/", config=config, server=streaming_server())
    with anyio.fail_after(30):
        async with transport:
            backplane = transport._backplane
            assert isinstance(backplane, RedisBackplane)
            relays = backplane._relays
            links = relays._links = WatchedLinks()
            # A resume reached another worker, which claimed the session's place here, then died
            # (nobody listens on its channel) before it could attach or detach.
            backplane._bus._dispatch(Claim(session_id="0" * 32, conn="conn", sender="gone-worker", arrived=1))
            assert "conn" in links
            await links.dropped.wait()
            assert not links


async def test_a_request_that_settles_unanswered_is_struck_off_by_the_sdks_hook(
    redis_url: str, redis_prefix: str, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = worker_app(redis_url, redis_prefix)
    transport = app.state.sse_transport
    backplane = transport._backplane
    assert isinstance(backplane, RedisBackplane)
    cluster = backplane._ledger

    async def no_strike_off_on_cancel(session: object, message: object) -> None:
        """Only mcp's ``on_request_unanswered`` hook is left to strike the request off."""

    monkeypatch.setattr(backplane.ledger, "after_delivery", no_strike_off_on_cancel)
    struck_off = anyio.Event()
    remove_pending = cluster.remove_pending

    async def watched(session_id: str, *request_ids: str | int) -> None:
        await remove_pending(session_id, *request_ids)
        if 7 in request_ids:
            struck_off.set()

    monkeypatch.setattr(cluster, "remove_pending", watched)
    entered = anyio.Event()
    hang_entered.append(entered)
    hang = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "hang", "arguments": {}}}
    try:
        with anyio.fail_after(30):
            async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
                async with RawSseStream.open(base) as raw:
                    post_url = await start_session(raw, http, retry_ms=50)
                    pending = f"{redis_prefix}{{{post_url[-32:]}}}:pending"
                    assert (await http.post(post_url, json=hang)).status_code == 202
                    await entered.wait()
                    assert await redis_client.smembers(pending) == {b"7"}
                    assert (await http.post(post_url, json=_cancel(7))).status_code == 202
                    await struck_off.wait()  # the server settled the request with no answer
                    assert await redis_client.scard(pending) == 0
    finally:
        hang_entered.remove(entered)
