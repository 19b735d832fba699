"""transport: ``SseServerTransport``, the legacy front end, on a real uvicorn on 127.0.0.1.

What the scenario tests already pin down is not repeated here:

- 413 over the body limit: test_serving.py (``test_max_request_body_size_bounds_a_post``);
- 202 for a delivered message: every scenario test (``initialize`` in test_integration.py);
- 503 "Too many open sessions" with ``Retry-After`` past ``max_sessions``: test_integration.py
  (``test_sessions_past_the_cap_get_503_and_open_ones_are_untouched``);
- a ``Last-Event-ID`` of an unknown session gets ``RESUME_UNKNOWN`` then a new session:
  test_hostile_input.py, test_hardening.py, test_resume.py, test_probe_sessions.py;
- ``redis_url`` without ``server`` refused: test_scaleout.py
  (``test_redis_url_needs_a_url_the_server_and_a_redis_store``);
- another credential's session under Starlette authentication, and over two workers:
  test_hardening.py, test_scaleout.py;
- the endpoint event's ``retry:``: asserted by test_resume.py's ``open_session``.

Here: the constructor's validation, ``_read_stream_writers``, each POST refusal by its exact
status and text, HEAD, the endpoint event's path (``root_path``, a leading slash added) and
id, the shutdown refusal's text and ``Retry-After``, and ``statistics()``.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Any
from uuid import UUID

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from mcp_sse_transport import RequestRejected, SseConfig, SseServerTransport, sse_app

from ._sdk_compat import Server
from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, serving
from .test_integration import OPEN, initialize, lowlevel_server
from .test_resume import _UserFromHeader

pytestmark = pytest.mark.anyio


def transport_of(app: Starlette) -> SseServerTransport:
    transport = app.state.sse_transport
    assert isinstance(transport, SseServerTransport)
    return transport


def session_of(post_url: str) -> str:
    return post_url.split("session_id=")[1]


class _SseEndpoint:
    """The GET endpoint as an application of the transport writes it."""

    def __init__(self, transport: SseServerTransport, server: Server[Any]) -> None:
        self.transport = transport
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with suppress(RequestRejected):
            async with self.transport.connect_sse(scope, receive, send) as (read_stream, write_stream):
                await self.server.run(read_stream, write_stream, self.server.create_initialization_options())


# -- construction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint", ["http://example.com/messages/", "//example.com/messages/", "/messages/?x=1", "/messages/#top"]
)
def test_a_full_url_is_refused_as_endpoint(endpoint: str) -> None:
    with pytest.raises(ValueError, match="is not a relative path"):
        SseServerTransport(endpoint)


@pytest.mark.parametrize("size", [0, -1])
def test_a_non_positive_body_size_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="max_request_body_size must be a positive number of bytes"):
        SseServerTransport("/messages/", max_request_body_size=size)


def test_a_relative_path_and_a_positive_body_size_are_accepted() -> None:
    transport = SseServerTransport("messages/", max_request_body_size=1)
    assert transport.config == SseConfig()
    assert transport._read_stream_writers == {}
    assert transport.statistics().open_sessions == 0


async def test_the_endpoint_event_carries_root_path_a_leading_slash_retry_and_the_first_id() -> None:
    """A transport given ``messages/`` (no leading slash), mounted under ``/api``: the endpoint
    event names ``/api/messages/``, which accepts the session's POSTs."""
    config = SseConfig(retry_interval=1.25)
    transport = SseServerTransport("messages/", security_settings=OPEN, config=config)
    server = lowlevel_server()
    inner = Starlette(
        routes=[
            Route("/sse", endpoint=_SseEndpoint(transport, server), methods=["GET"]),
            Mount("/messages/", app=transport.handle_post_message),
        ]
    )
    app = Starlette(routes=[Mount("/api", app=inner)])
    app.state.sse_transport = transport  # uvicorn_server drains it as uvicorn starts shutting down
    with anyio.fail_after(20):
        async with serving(app) as base, RawSseStream.open(base, "/api/sse") as raw:
            async with httpx2.AsyncClient(base_url=base) as http:
                endpoint = await raw.next_event()
                assert endpoint is not None and endpoint.event == "endpoint"
                path, _, session_id = endpoint.data.partition("?session_id=")
                assert path == "/api/messages/"
                assert UUID(hex=session_id).hex == session_id
                assert endpoint.retry == 1250
                session = transport._host.sessions.get(session_id)
                assert session is not None
                assert endpoint.id == f"{session_id}.{session.handler.secret}:0"
                ping = {"jsonrpc": "2.0", "id": "via-root-path", "method": "ping"}
                assert (await http.post(endpoint.data, json=ping)).status_code == 202
                pong = await raw.next_event()
                assert pong is not None and pong.json() == {"jsonrpc": "2.0", "id": "via-root-path", "result": {}}
                assert pong.id == f"{session_id}.{session.handler.secret}:1"


# -- the stock class's session map -----------------------------------------------------------------


async def test_read_stream_writers_maps_open_sessions_by_uuid() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    transport = transport_of(app)
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            async with RawSseStream.open(base) as first, RawSseStream.open(base) as second:
                ids = [session_of(await initialize(first, http)), session_of(await initialize(second, http))]
                writers = transport._read_stream_writers
                assert set(writers) == {UUID(hex=session_id) for session_id in ids}
                for session_id in ids:
                    session = transport._host.sessions.get(session_id)
                    assert session is not None and writers[UUID(hex=session_id)] is session.inbound


# -- POST ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_anything_but_post_to_the_message_endpoint_is_405_allowing_post(method: str) -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            response = await http.request(method, "/messages/", params={"session_id": "0" * 32})
            assert response.status_code == 405
            assert response.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("params", "status", "text"),
    [
        ({}, 400, "session_id is required"),
        ({"session_id": ""}, 400, "Invalid session ID"),
        ({"session_id": "not-a-uuid"}, 400, "Invalid session ID"),
        ({"session_id": "0" * 32}, 404, "Could not find session"),
    ],
    ids=["missing", "empty", "malformed", "unknown"],
)
async def test_a_post_that_names_no_open_session_is_refused(params: dict[str, str], status: int, text: str) -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            response = await http.post("/messages/", params=params, json=ping)
            assert (response.status_code, response.text) == (status, text)


async def test_a_post_under_another_bearer_credential_is_404_and_logs_only_the_tag(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    app.add_middleware(_UserFromHeader)
    alice, bob = {"x-user": "alice"}, {"x-user": "bob"}
    caplog.set_level(logging.INFO, logger="mcp_sse_transport")
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base, headers=alice) as http:
            async with RawSseStream.open(base, headers=alice) as raw:
                post_url = await initialize(raw, http)
                session_id = session_of(post_url)
                ping = {"jsonrpc": "2.0", "id": "bob", "method": "ping"}
                for other in (bob, {"x-user": ""}):
                    refused = await http.post(post_url, json=ping, headers=other)
                    assert (refused.status_code, refused.text) == (404, "Could not find session")
                # Alice's own POST still reaches her session, and nothing of bob's was delivered.
                mine = {"jsonrpc": "2.0", "id": "alice", "method": "ping"}
                assert (await http.post(post_url, json=mine)).status_code == 202
                answer = await raw.next_event()
                assert answer is not None and answer.json()["id"] == "alice"
    refusals = [
        record.getMessage()
        for record in caplog.records
        if record.name == "mcp_sse_transport" and record.getMessage().startswith("POST for unknown session")
    ]
    assert refusals == [f"POST for unknown session {session_id[:8]}"] * 2
    assert not [record for record in caplog.records if session_id in record.getMessage()]


# -- GET -------------------------------------------------------------------------------------------


async def test_head_answers_200_with_the_sse_headers_no_body_and_no_session() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    transport = transport_of(app)
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            response = await http.head("/sse")
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["x-accel-buffering"] == "no"
            assert response.content == b""
            assert transport.statistics().open_sessions == 0
            assert transport._read_stream_writers == {}


async def test_after_shutdown_a_get_is_503_server_shutting_down_with_retry_after() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN, config=SseConfig(retry_interval=4))
    transport = transport_of(app)
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            await transport.shutdown()
            refused = await http.get("/sse")
            assert (refused.status_code, refused.text) == (503, "Server shutting down")
            assert refused.headers["retry-after"] == "4"
            assert transport.statistics().open_sessions == 0


async def test_retry_after_is_at_least_one_second() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN, config=SseConfig(retry_interval=0.2))
    transport = transport_of(app)
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            await transport.shutdown()
            refused = await http.get("/sse")
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"


# -- statistics ------------------------------------------------------------------------------------


async def test_statistics_count_open_sessions_their_events_and_shutdown() -> None:
    app = sse_app(lowlevel_server(), transport_security=OPEN)
    transport = transport_of(app)
    with anyio.fail_after(20):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            assert transport.statistics().open_sessions == 0
            async with RawSseStream.open(base) as first, RawSseStream.open(base) as second:
                ids = [session_of(await initialize(first, http)), session_of(await initialize(second, http))]
                ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
                assert (await http.post(f"/messages/?session_id={ids[0]}", json=ping)).status_code == 202
                assert await first.next_event() is not None
                stats = transport.statistics()
                assert stats.open_sessions == 2 and not stats.shutting_down
                assert sorted(s.session for s in stats.sessions) == sorted(session_id[:8] for session_id in ids)
                # Each session wrote the initialize's answer; the first, the ping's too.
                assert stats.events_sent == 3 == sum(s.events_sent for s in stats.sessions)
                assert stats.buffered_events == 0 and stats.producers_waiting == 0
                await transport.shutdown()
                assert transport.statistics().shutting_down
