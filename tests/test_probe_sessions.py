"""Probe sessions: a stream that no POST ever reached ends with its connection.

mcp-remote opens three SSE streams each time it starts and reads only one; 300 bare connects
used to hold 300 sessions (their servers, buffers and replay logs) for the whole ``session_grace``
(30 s). A session that received a message keeps waiting the grace for a resume.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any

import anyio
import anyio.abc
import pytest
from starlette.applications import Starlette

from mcp_sse_transport import (
    ErrorCode,
    InMemoryEventStore,
    SessionHandler,
    SessionState,
    SseConfig,
    SseServerTransport,
    sse_app,
)

from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, serving
from .test_integration import OPEN, initialize
from .test_resume import call_stream, streaming_server

pytestmark = pytest.mark.anyio

CLEANUP_BOUND = 5.0
"""How long a probe's cleanup may take in these tests: a sixth of the 30 s grace it no longer
waits (it takes milliseconds; the margin is for a loaded CI machine)."""


def _transport_app() -> tuple[SseServerTransport, Starlette]:
    app = sse_app(streaming_server(), transport_security=OPEN)  # the default session_grace, 30 s
    transport: SseServerTransport = app.state.sse_transport
    assert transport.config.session_grace == SseConfig().session_grace == 30
    return transport, app


def _stored_sessions(transport: SseServerTransport) -> int:
    store = transport._backplane.store
    assert isinstance(store, InMemoryEventStore)
    return len(store)


async def _warm_up(base: str) -> set[asyncio.Task[object]]:
    """One request, so uvicorn has started everything it keeps running; the tasks alive after it."""
    async with httpx2.AsyncClient(base_url=base) as http:
        assert (await http.post("/messages/")).status_code == 400
    return set(asyncio.all_tasks())


async def _no_tasks_beyond(baseline: set[asyncio.Task[object]]) -> None:
    """Return once every task started since ``baseline`` has finished."""
    while pending := {task for task in asyncio.all_tasks() - baseline if not task.done()}:
        await asyncio.wait(pending)


class _Registrations:
    """Counts sessions as the transport registers them, so a test can wait for streams it
    never reads to have opened their sessions."""

    def __init__(self, transport: SseServerTransport, monkeypatch: pytest.MonkeyPatch) -> None:
        self._registry = transport._host.sessions
        self._wanted = 0
        self._reached = anyio.Event()
        add = self._registry.add

        def counting_add(session_id: str, entry: Any) -> None:
            add(session_id, entry)
            if len(self._registry) >= self._wanted:
                self._reached.set()

        monkeypatch.setattr(self._registry, "add", counting_add)

    async def open(self, count: int) -> list[SessionHandler]:
        """The handlers of the open sessions, once there are ``count``."""
        self._wanted = count
        if len(self._registry) < count:
            await self._reached.wait()
        return [session.handler for _, session in self._registry.items()]


async def _bare_get(base: str) -> anyio.abc.SocketStream:
    """A GET that is sent and never read, as mcp-remote's probes are."""
    host, port = base.removeprefix("http://").split(":")
    stream = await anyio.connect_tcp(host, int(port))
    await stream.send(f"GET /sse HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
    return stream


async def test_a_stream_dropped_before_any_post_leaves_no_session_and_no_task_behind() -> None:
    transport, app = _transport_app()
    with anyio.fail_after(30):
        async with serving(app) as base:
            baseline = await _warm_up(base)
            async with RawSseStream.open(base) as raw:
                endpoint = await raw.next_event()
                assert endpoint is not None and endpoint.event == "endpoint" and endpoint.id is not None
                session_id = endpoint.data.split("session_id=")[1]
                session = transport._host.sessions.get(session_id)
                assert session is not None
            with anyio.fail_after(CLEANUP_BOUND):
                await session.handler.linger()  # returns once the session has ended
                await _no_tasks_beyond(baseline)
            assert session.handler.state is SessionState.BROKEN
            assert transport.statistics().open_sessions == 0
            assert _stored_sessions(transport) == 0, "no replay log left behind"
            # Nothing to resume: the id the endpoint event carried names no session any more.
            async with RawSseStream.open(base, headers={"Last-Event-ID": endpoint.id}) as again:
                refused = await again.next_event()
                assert refused is not None and refused.event == "error"
                assert refused.json()["code"] == ErrorCode.RESUME_UNKNOWN


async def test_the_mcp_remote_pattern_holds_no_session_past_its_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two probe streams opened and never read, and one real session, per start, three starts;
    then every connection closes. The probes go with their connections; the real sessions wait
    the grace, and resume."""
    transport, app = _transport_app()
    registrations = _Registrations(transport, monkeypatch)
    starts = 3
    with anyio.fail_after(60):
        async with serving(app) as base, httpx2.AsyncClient(base_url=base) as http:
            baseline = await _warm_up(base)
            async with AsyncExitStack() as probes:
                real: list[tuple[str, str]] = []  # each real session's POST URL and last event id
                for _ in range(starts):
                    for _ in range(2):
                        probes.push_async_callback((await _bare_get(base)).aclose)
                    async with RawSseStream.open(base) as raw:
                        post_url = await initialize(raw, http)
                        assert (await http.post(post_url, json=call_stream(2))).status_code == 202
                        events = [await raw.next_event() for _ in range(3)]  # 2 progress, the result
                        last = events[-1]
                        assert last is not None and last.id is not None and last.json()["id"] == 1
                        real.append((post_url, last.id))
                handlers = await registrations.open(3 * starts)
                real_ids = {post_url.split("session_id=")[1] for post_url, _ in real}
                probe_handlers = [h for h in handlers if h.session_id not in real_ids]
                assert len(probe_handlers) == 2 * starts
                assert all(not h.ended for h in probe_handlers), "a probe lives as long as its connection"
            # Every probe's connection is closed now.
            with anyio.fail_after(CLEANUP_BOUND):
                for handler in probe_handlers:
                    await handler.linger()
            stats = transport.statistics()
            assert stats.open_sessions == starts, "only the sessions that received messages are left"
            assert {s.session for s in stats.sessions} == {session_id[:8] for session_id in real_ids}
            assert not any(s.attached for s in stats.sessions), "detached, waiting for a resume"
            # They resume, with their server still there.
            for post_url, last_id in real:
                async with RawSseStream.open(base, headers={"Last-Event-ID": last_id}) as resumed:
                    endpoint = await resumed.next_event()
                    assert endpoint is not None and endpoint.data == post_url
                    call = {**call_stream(1), "id": 2}
                    assert (await http.post(post_url, json=call)).status_code == 202
                    answers = [await resumed.next_event() for _ in range(2)]
                    assert answers[-1] is not None and answers[-1].json()["id"] == 2
            await transport.shutdown()
            with anyio.fail_after(CLEANUP_BOUND):
                await _no_tasks_beyond(baseline)


async def test_three_hundred_bare_connects_hold_no_session_once_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    transport, app = _transport_app()
    registrations = _Registrations(transport, monkeypatch)
    count = 300
    with anyio.fail_after(60):
        async with serving(app) as base:
            baseline = await _warm_up(base)
            async with AsyncExitStack() as probes:
                for _ in range(count):
                    probes.push_async_callback((await _bare_get(base)).aclose)
                handlers = await registrations.open(count)
            with anyio.fail_after(CLEANUP_BOUND):
                for handler in handlers:
                    await handler.linger()
                await _no_tasks_beyond(baseline)
            assert transport.statistics().open_sessions == 0
            assert _stored_sessions(transport) == 0


async def test_a_probe_resumed_while_its_connection_is_attached_is_kept_for_a_resume() -> None:
    """A resume that arrives before the server noticed the drop supersedes the probe's stream: a
    client that resumes wants the session, so it is kept, and waits the grace like any other."""
    transport, app = _transport_app()
    with anyio.fail_after(30):
        async with serving(app) as base:
            async with RawSseStream.open(base) as first:
                endpoint = await first.next_event()
                assert endpoint is not None and endpoint.id is not None
                session = transport._host.sessions.get(endpoint.data.split("session_id=")[1])
                assert session is not None
                async with RawSseStream.open(base, headers={"Last-Event-ID": endpoint.id}) as second:
                    resumed = await second.next_event()
                    assert resumed is not None and resumed.data == endpoint.data
                    superseded = await first.next_event()
                    assert superseded is not None and superseded.json()["code"] == ErrorCode.SUPERSEDED
                    assert await first.next_event() is None and first.ended
                    assert session.handler.attached and not session.handler.ended
            with anyio.fail_after(CLEANUP_BOUND):
                await session.handler.detached()
            assert not session.handler.ended
            assert transport.statistics().open_sessions == 1
            async with RawSseStream.open(base, headers={"Last-Event-ID": endpoint.id}) as third:
                again = await third.next_event()
                assert again is not None and again.event == "endpoint" and again.data == endpoint.data
            await transport.shutdown()
