"""A Streamable HTTP session's streams over a real uvicorn and raw HTTP: polling by
``close_sse_stream``, a cancelled request, shutdown, request ids in flight, the stream cap, the
standalone GET stream and its resume, the replay of a stream that already ended."""

from __future__ import annotations

import anyio
import pytest

from mcp_sse_transport import ErrorCode, SseConfig, StreamableHTTPSessionManager, _sdk, streamable_http_app

from ._sdk_compat import Context, MCPServer, needs_related_progress
from ._sdk_compat import httpx as httpx2
from ._streamable import data, headers, message, open_session
from ._support import RawSseStream, SseEvent, serving

pytestmark = pytest.mark.anyio


class _Gate:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()


def _call(request_id: int, name: str) -> bytes:
    return message("tools/call", request_id, {"name": name, "arguments": {}, "_meta": {"progressToken": request_id}})


def _gated_server(gate: _Gate) -> MCPServer:
    server = MCPServer("session")

    @server.tool()
    async def hold(ctx: Context) -> str:
        await ctx.report_progress(1, 2)
        gate.started.set()
        await gate.release.wait()
        await ctx.report_progress(2, 2)
        return "held"

    @server.tool()
    async def poll(ctx: Context) -> str:
        await ctx.report_progress(1, 2)
        await ctx.close_sse_stream()  # the client comes back with Last-Event-ID
        gate.started.set()
        await gate.release.wait()
        await ctx.report_progress(2, 2)
        return "polled"

    return server


async def _events(stream: RawSseStream) -> list[SseEvent]:
    events = []
    while (event := await stream.next_event()) is not None:
        events.append(event)
    return events


@needs_related_progress
async def test_close_sse_stream_ends_the_stream_cleanly_and_a_resume_gets_the_rest() -> None:
    """Polling (SEP-1699): the tool ends its stream; it ends with its terminator (no error), the
    client comes back with the last id it saw and gets what followed, then the answer."""
    gate = _Gate()
    async with serving(streamable_http_app(_gated_server(gate))) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base)
            async with RawSseStream.open(base, "/mcp", headers(session_id), post=_call(1, "poll")) as first:
                events = await _events(first)
                assert first.ended, "a clean end: the terminating chunk"
            await gate.started.wait()
            assert [event.json()["params"]["progress"] for event in events if event.data] == [1]
            assert events[0].retry is not None  # the priming event says when to come back
            gate.release.set()
            resume = headers(session_id, **{"last-event-id": events[-1].id or ""})
            async with RawSseStream.open(base, "/mcp", resume) as second:
                rest = await _events(second)
    received = [event.json() for event in rest if event.data]
    assert [event["params"]["progress"] for event in received[:-1]] == [2]
    assert received[-1]["id"] == 1 and received[-1]["result"]["content"][0]["text"] == "polled"


async def test_a_cancelled_request_ends_its_stream_with_request_cancelled() -> None:
    gate = _Gate()
    async with serving(streamable_http_app(_gated_server(gate))) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base)
            async with RawSseStream.open(base, "/mcp", headers(session_id), post=_call(1, "hold")) as stream:
                await gate.started.wait()
                cancel = message("notifications/cancelled", None, {"requestId": 1, "reason": "no longer needed"})
                async with httpx2.AsyncClient(timeout=5) as client:
                    response = await client.post(f"{base}/mcp", content=cancel, headers=headers(session_id))
                    assert response.status_code == 202
                events = [event.json() for event in await _events(stream) if event.data]
    # -32800 on 2.x (the transport answers it); mcp 1.x's server answers a cancelled request itself, with 0
    cancelled = _sdk.REQUEST_CANCELLED
    assert events[-1] == {"jsonrpc": "2.0", "id": 1, "error": {"code": cancelled, "message": "Request cancelled"}}


async def test_shutdown_answers_every_waiting_request_and_ends_its_stream_with_a_retry_hint() -> None:
    gate = _Gate()
    app = streamable_http_app(_gated_server(gate), config=SseConfig(drain_timeout=1))
    manager: StreamableHTTPSessionManager = app.state.session_manager
    async with serving(app) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base)
            async with RawSseStream.open(base, "/mcp", headers(session_id), post=_call(1, "hold")) as stream:
                await gate.started.wait()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(manager.shutdown)
                    events = await _events(stream)
            after = await httpx2.AsyncClient(timeout=5).post(
                f"{base}/mcp", content=message("ping", 2), headers=headers(session_id)
            )
    answers = [event.json() for event in events if event.data and event.event == "message"]
    assert answers[-1] == {"jsonrpc": "2.0", "id": 1, "error": {"code": -32051, "message": "Server shutting down"}}
    final = events[-1]
    assert final.event == "error" and final.json()["code"] == ErrorCode.SERVER_SHUTDOWN and final.retry is not None
    assert after.status_code in (404, 503)


async def test_a_request_id_in_flight_is_refused_and_free_again_once_answered() -> None:
    gate = _Gate()
    async with serving(streamable_http_app(_gated_server(gate))) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base)
            async with RawSseStream.open(base, "/mcp", headers(session_id), post=_call(1, "hold")) as first:
                await gate.started.wait()
                async with httpx2.AsyncClient(timeout=5) as client:
                    again = await client.post(f"{base}/mcp", content=message("ping", 1), headers=headers(session_id))
                    assert again.status_code == 409
                    assert again.json()["error"]["message"] == "Request id already in use in this session"
                    gate.release.set()
                    await first.drain()
                    reused = await client.post(f"{base}/mcp", content=message("ping", 1), headers=headers(session_id))
    assert data(reused.text) == [{"jsonrpc": "2.0", "id": 1, "result": {}}]


async def test_past_max_session_streams_a_request_gets_503_with_retry_after() -> None:
    gate = _Gate()
    config = SseConfig(max_session_streams=2)
    async with serving(streamable_http_app(_gated_server(gate), config=config)) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base)
            # The initialize's stream ended and is kept for a resume: forgotten first at the cap.
            async with RawSseStream.open(base, "/mcp", headers(session_id), post=_call(1, "hold")) as one:
                await gate.started.wait()
                async with RawSseStream.open(base, "/mcp", headers(session_id), post=_call(2, "hold")) as two:
                    assert two.status == 200
                    await two.next_event()
                    async with httpx2.AsyncClient(timeout=5) as client:
                        refused = await client.post(
                            f"{base}/mcp", content=message("ping", 3), headers=headers(session_id)
                        )
                    gate.release.set()
                    await two.drain()
                await one.drain()
    assert refused.status_code == 503 and refused.headers["retry-after"] == "3"
    assert refused.json()["error"]["message"] == "Too many streams in this session"


async def test_the_standalone_stream_carries_unrelated_messages_and_one_get_at_a_time() -> None:
    """Messages of no request go to the standalone GET stream; a second GET is refused (409); a
    GET with the last id the first saw, once that one dropped, resumes it with what followed."""
    server = MCPServer("standalone")
    app = streamable_http_app(server)
    manager: StreamableHTTPSessionManager = app.state.session_manager
    async with serving(app) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base)
            hosted = manager._server_instances[session_id]
            standalone = hosted.streams.standalone
            async with RawSseStream.open(base, "/mcp", headers(session_id)) as first:
                assert first.status == 200 and first.headers["mcp-session-id"] == session_id
                async with httpx2.AsyncClient(timeout=5) as client:
                    second = await client.get(f"{base}/mcp", headers=headers(session_id))
                assert second.status_code == 409
                await standalone.send(message("notifications/tools/list_changed"))
                seen = await first.next_event()
                assert seen is not None and seen.json()["method"] == "notifications/tools/list_changed"
            await standalone.detached()
            await standalone.send(message("notifications/prompts/list_changed"))  # while nobody reads
            resume = headers(session_id, **{"last-event-id": seen.id or ""})
            async with RawSseStream.open(base, "/mcp", resume) as back:
                primed = await back.next_event()  # a resumed stream is primed again, at the id resumed from
                missed = await back.next_event()
    assert primed is not None and primed.id == seen.id and not primed.data
    assert missed is not None and missed.json()["method"] == "notifications/prompts/list_changed"


async def test_an_answered_stream_stays_resumable_and_replays_what_followed_an_id() -> None:
    """A client cut off after the server finished its stream (a proxy took the bytes) comes back
    with the priming id: it gets the stream's events again, then the answer, then the end."""
    gate = _Gate()
    gate.release.set()
    async with serving(streamable_http_app(_gated_server(gate))) as base:
        with anyio.fail_after(15):
            session_id = await open_session(base)
            async with RawSseStream.open(base, "/mcp", headers(session_id), post=_call(1, "hold")) as stream:
                events = await _events(stream)
            priming = events[0]
            assert priming.id is not None and not priming.data
            resume = headers(session_id, **{"last-event-id": priming.id})
            async with RawSseStream.open(base, "/mcp", resume) as replay:
                replayed = await _events(replay)
                assert replay.ended
    assert [event.data for event in replayed] == [event.data for event in events[1:]]
    assert [event.id for event in replayed] == [event.id for event in events[1:]]
