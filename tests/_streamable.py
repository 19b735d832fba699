"""Raw Streamable HTTP for the tests: JSON-RPC bodies, a session opened by hand, the headers a
2025-11-25 client sends, and the events of a response body."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream

PROTOCOL = "2025-11-25"
MODERN = "2026-07-28"


def message(method: str, request_id: int | str | None = None, params: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if request_id is not None:
        body["id"] = request_id
    if params is not None:
        body["params"] = params
    return json.dumps(body).encode()


INITIALIZE = message(
    "initialize",
    0,
    {"protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
)


def headers(session_id: str | None = None, **extra: str) -> dict[str, str]:
    """What a 2025-11-25 client sends with a POST (``session_id``: in its session)."""
    sent = {
        "mcp-protocol-version": PROTOCOL,
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        **extra,
    }
    if session_id is not None:
        sent["mcp-session-id"] = session_id
    return sent


async def open_session(base: str, path: str = "/mcp", extra: dict[str, str] | None = None) -> str:
    """Initialize a session over raw HTTP (``initialize``, then ``notifications/initialized``); its id."""
    async with RawSseStream.open(base, path, extra, post=INITIALIZE) as stream:
        assert stream.status == 200, stream.status
        session_id = stream.headers["mcp-session-id"]
        while (event := await stream.next_event()) is not None and not event.data:
            pass  # the priming event
        assert event is not None and event.json()["id"] == 0
    async with httpx2.AsyncClient() as client:
        response = await client.post(
            f"{base}{path}", content=message("notifications/initialized"), headers=headers(session_id, **(extra or {}))
        )
        assert response.status_code == 202
    return session_id


def data(body: str) -> list[Any]:
    """The JSON of every event with data in an event-stream body (priming events have none)."""
    return [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:") and line[5:].strip()]


class Logged(logging.Handler):
    """Sets ``seen`` once a record whose message contains ``text`` is logged: a test waits on it.
    The logger must let INFO records through (``caplog.set_level``) for it to see them."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.INFO)
        self.text = text
        self.seen = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@contextmanager
def asgi_errors() -> Iterator[Logged]:
    """Watch uvicorn's error log for an exception that escaped the app (enter it once uvicorn is
    serving: its logging setup replaces the handlers of its loggers)."""
    watcher = Logged("Exception in ASGI application")
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
