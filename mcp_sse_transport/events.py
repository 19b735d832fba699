"""Server-Sent Events encoding: pure functions from fields to wire bytes.

Follows the WHATWG HTML "server-sent events" grammar, and the line separator of the SDK's stock
writer (``\\r\\n``, sse-starlette's default), so the bytes match what stock clients already parse.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

__all__ = ["HEARTBEAT", "encode_comment", "encode_error", "encode_event", "encode_message", "error_body"]

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def _check_field(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValueError(f"SSE {name} must not contain a line break: {value!r}")
    if name == "id" and "\0" in value:
        raise ValueError("SSE id must not contain NUL (clients ignore such ids)")


def encode_event(
    data: bytes | str,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
) -> bytes:
    """Encode one event; ``data`` may hold any line breaks, each becomes its own ``data:`` line.

    Field order is ``event``, ``data``, ``id``, ``retry``: the stock writer's ``endpoint`` event
    starts with ``event:`` then ``data:``, which the SDK's tests pin, and SSE allows any order.
    """
    if isinstance(data, str):
        data = data.encode()
    parts: list[bytes] = []
    if event is not None:
        _check_field("event", event)
        parts.append(b"event: %s\r\n" % event.encode())
    if b"\r" in data or b"\n" in data:
        parts.extend(b"data: %s\r\n" % line for line in _LINE_BREAK.split(data))
    else:
        parts += (b"data: ", data, b"\r\n")
    if id is not None:
        _check_field("id", id)
        parts.append(b"id: %s\r\n" % id.encode())
    if retry is not None:
        if retry < 0:
            raise ValueError(f"SSE retry must be a non-negative number of milliseconds, got {retry}")
        parts.append(b"retry: %d\r\n" % retry)
    parts.append(b"\r\n")
    return b"".join(parts)


def encode_message(data: bytes, id_prefix: bytes, token: str) -> bytes:
    """``encode_event(data, event="message", id=...)`` for the hot path: one concatenation when
    ``data`` is one line (JSON always is), the id being ``id_prefix`` then ``token``."""
    if b"\n" in data or b"\r" in data:
        return encode_event(data, event="message", id=(id_prefix + token.encode()).decode())
    return b"event: message\r\ndata: " + data + b"\r\nid: " + id_prefix + token.encode() + b"\r\n\r\n"


def encode_comment(text: str = "") -> bytes:
    """Encode a comment block; clients ignore it, proxies see traffic."""
    lines = _LINE_BREAK.split(text.encode())
    return b"".join(b": %s\r\n" % line if line else b":\r\n" for line in lines) + b"\r\n"


HEARTBEAT: Final = encode_comment("ping")
"""The idle heartbeat: a comment, so no client mistakes it for data (stock pings are comments too)."""


def error_body(code: int, message: str, data: Any = None) -> str:
    """The JSON of an ``error`` event: the JSON-RPC error object's shape."""
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    return json.dumps(body, separators=(",", ":"))


def encode_error(code: int, message: str, data: Any = None, *, retry: int | None = None) -> bytes:
    """Encode an ``event: error`` carrying ``{code, message, data}``."""
    return encode_event(error_body(code, message, data), event="error", retry=retry)
