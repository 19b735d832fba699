"""Hostile input over real sockets: random POSTs get documented answers, the session loses
nothing, and no log line carries a whole session id."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlencode

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_sse_transport import ErrorCode, SseConfig, sse_app

from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, serving
from .test_integration import OPEN, initialize, lowlevel_server

pytestmark = pytest.mark.anyio

DOCUMENTED = {
    202: {"Accepted"},
    400: {"session_id is required", "Invalid session ID", "Invalid Content-Type header", "Could not parse message"},
    404: {"Could not find session"},
    413: {"Request body too large"},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=600),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {"jsonrpc": st.sampled_from(["2.0", "1.0", 2]), "method": st.text(max_size=12) | st.integers()},
        optional={"id": st.integers() | st.text(max_size=8) | st.none(), "params": json_values},
    ).map(lambda value: json.dumps(value).encode()),
)
session_params = st.sampled_from(
    ["ours", "ours-uppercase", "ours-hyphenated", "missing", "unknown", "garbage", "empty"]
)
content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "text/plain", None, "APPLICATION/JSON"]
)


def _session_query(kind: str, session_id: str) -> dict[str, str]:
    hyphenated = f"{session_id[:8]}-{session_id[8:12]}-{session_id[12:16]}-{session_id[16:20]}-{session_id[20:]}"
    return {
        "ours": {"session_id": session_id},
        "ours-uppercase": {"session_id": session_id.upper()},
        "ours-hyphenated": {"session_id": hyphenated},
        "missing": {},
        "unknown": {"session_id": "0" * 32},
        "garbage": {"session_id": "../../etc/passwd"},
        "empty": {"session_id": ""},
    }[kind]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, kind=session_params, content_type=content_types)
async def test_random_posts_get_documented_answers_and_the_session_loses_nothing(
    body: bytes, kind: str, content_type: str | None
) -> None:
    config = SseConfig(heartbeat_interval=30)
    with anyio.fail_after(20):
        app = sse_app(lowlevel_server(), transport_security=OPEN, config=config, max_request_body_size=512)
        async with serving(app) as base, RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
            post_url = await initialize(raw, http)
            session_id = post_url.split("session_id=")[1]
            headers = {"content-type": content_type} if content_type is not None else {}
            response = await http.post(
                "/messages/", params=_session_query(kind, session_id), content=body, headers=headers
            )
            assert response.status_code in DOCUMENTED, response.status_code
            assert response.text in DOCUMENTED[response.status_code]
            # The session still answers, in order, and the transport's own events are documented.
            ping = {"jsonrpc": "2.0", "id": "probe", "method": "ping"}
            assert (await http.post(post_url, json=ping)).status_code == 202
            while (event := await raw.next_event()) is not None:
                message: Any = event.json()
                if event.event == "error":
                    assert message["code"] == ErrorCode.PARSE_ERROR
                    continue
                if message.get("id") == "probe":
                    assert message == {"jsonrpc": "2.0", "id": "probe", "result": {}}
                    break
            assert event is not None, "the session must survive any POST"


SERVER_LOGGERS = ("mcp_sse_transport", "uvicorn", "mcp.server", "starlette")


async def test_no_server_log_record_carries_a_whole_session_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    access_log = logging.getLogger("uvicorn.access")
    config = SseConfig(session_grace=0)
    with anyio.fail_after(20):
        app = sse_app(lowlevel_server(), transport_security=OPEN, config=config)
        async with serving(app, log_level="debug") as base:
            # After uvicorn configured its loggers: the access log does not propagate to the root.
            access_log.addHandler(caplog.handler)
            async with RawSseStream.open(base) as raw, httpx2.AsyncClient(base_url=base) as http:
                post_url = await initialize(raw, http)
                session_id = post_url.split("session_id=")[1]
                await http.post(post_url, content=b"not json", headers={"content-type": "application/json"})
                await http.post(post_url.replace(session_id, "f" * 32), json={"jsonrpc": "2.0", "method": "x"})
    access_log.removeHandler(caplog.handler)
    messages = [record.getMessage() for record in caplog.records if record.name.startswith(SERVER_LOGGERS)]
    assert any(session_id[:8] in message for message in messages), "the session is logged, by its tag"
    assert any("POST /messages/?session_id=" in message for message in messages), "the access log was seen"
    assert not [message for message in messages if session_id in message or "f" * 32 in message]


last_event_ids = st.one_of(
    st.text(max_size=200),
    st.text(alphabet="0123456789abcdef:", min_size=30, max_size=80),
    st.builds(lambda n: "0" * 32 + f":{n}", st.integers(min_value=0, max_value=10**30)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=last_event_ids)
async def test_arbitrary_last_event_ids_never_reach_another_session(value: str) -> None:
    with anyio.fail_after(20):
        async with serving(sse_app(lowlevel_server(), transport_security=OPEN)) as base:
            async with RawSseStream.open(base) as victim, httpx2.AsyncClient(base_url=base) as http:
                victim_session = (await initialize(victim, http)).split("session_id=")[1]
                # As a query parameter: header values are limited to what HTTP allows.
                async with RawSseStream.open(base, path=f"/sse?{_query(value)}") as raw:
                    first = await raw.next_event()
                    assert first is not None
                    if first.event == "error":
                        assert first.json()["code"] == ErrorCode.RESUME_UNKNOWN
                        first = await raw.next_event()
                    assert first is not None and first.event == "endpoint"
                    assert victim_session not in first.data


def _query(value: str) -> str:
    return urlencode({"last_event_id": value})
