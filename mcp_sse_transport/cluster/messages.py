"""The messages workers exchange over Redis pub/sub, typed and versioned.

A message on the wire is a one-line JSON header, ``{"v": PROTOCOL_VERSION, "t": kind, ...}``
with one short key per field, then, for the kinds that carry bytes (:class:`Post`,
:class:`Chunk`), ``\\n`` and the raw body (never JSON-escaped). :func:`decode` checks the
version first, then every field's type: a message of another version (a worker of another
release, during a rolling upgrade) or malformed raises :class:`MessageError`, never a misread.

Pure: no I/O, no SDK types (:attr:`Post.user` is the access token already as a JSON-able dict).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeAlias

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Attach",
    "Chunk",
    "Claim",
    "Detach",
    "End",
    "Message",
    "MessageError",
    "Post",
    "Posted",
    "decode",
    "encode",
]

PROTOCOL_VERSION = 1
"""The version this module speaks; bump it for any change a worker of the previous release would misread."""


class MessageError(ValueError):
    """Data that is not a message of this protocol version: malformed, of an unknown kind, or of
    another version."""


_Parse = Callable[[object], Any]
"""Checks a field's JSON value and returns it as the dataclass holds it; raises TypeError or
ValueError with what was expected."""


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("a string")
    return value


def _integer(low: int, high: float, what: str) -> _Parse:
    def parse(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise TypeError(what)
        return value

    return parse


_count = _integer(0, float("inf"), "a non-negative integer")
_status = _integer(100, 599, "an HTTP status (an integer from 100 to 599)")


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError("a boolean")
    return value


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    pairs = value if isinstance(value, list | tuple) else None
    if pairs is None or not all(
        isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(part, str) for part in pair)
        for pair in pairs
    ):
        raise TypeError("a list of [name, value] string pairs")
    return tuple((name, text) for name, text in pairs)


def _user(value: object) -> dict[str, Any] | None:
    if value is not None and not (isinstance(value, dict) and all(isinstance(key, str) for key in value)):
        raise TypeError("an object or null")
    return value


def _wire(key: str, parse: _Parse) -> dict[str, Any]:
    return {"key": key, "parse": parse}


@dataclass(frozen=True, slots=True)
class Post:
    """A POST for a session another worker owns: the worker it reached sends it to the owner,
    which delivers it and answers the sender with :class:`Posted`."""

    kind: ClassVar[str] = "post"
    """The header's ``t``; each class has its own."""
    session_id: str = field(metadata=_wire("sid", _string))
    path: str = field(metadata=_wire("p", _string))
    """The request's ASGI ``path``."""
    query: str = field(metadata=_wire("q", _string))
    """The query string, decoded as latin-1."""
    headers: tuple[tuple[str, str], ...] = field(metadata=_wire("h", _headers))
    """The request's headers, ``(name, value)``, each decoded as latin-1."""
    user: dict[str, Any] | None = field(metadata=_wire("u", _user))
    """The authenticated user's access token as JSON, ``None`` if anonymous."""
    reply_to: str = field(metadata=_wire("r", _string))
    """Names the sender's wait for the answer: :attr:`Posted.reply_to` repeats it."""
    sender: str = field(metadata=_wire("f", _string))
    """The sending worker's id: where the answer goes."""
    body: bytes
    """The POSTed bytes."""


@dataclass(frozen=True, slots=True)
class Posted:
    """The owner's answer to a :class:`Post`, sent back to the Post's sender."""

    kind: ClassVar[str] = "posted"
    reply_to: str = field(metadata=_wire("r", _string))
    status: int = field(metadata=_wire("s", _status))
    """The HTTP status the owner answered the POST with."""
    text: str = field(default="", metadata=_wire("x", _string))
    """The owner's answer's body, sent on as it is (a JSON-RPC error for a refused id, say)."""
    json: bool = field(default=False, metadata=_wire("j", _flag))
    """The body is JSON (``application/json``), not text."""
    retry: bool = field(default=False, metadata=_wire("y", _flag))
    """The owner answered with ``Retry-After``: the client may send it again later."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A resume of the session arrived at another worker: the relaying worker sends it to the
    owner, to take the session's place in line as it arrived. :class:`Attach` follows once the
    relaying worker replayed what it could, or :class:`Detach` gives the claim back."""

    kind: ClassVar[str] = "claim"
    session_id: str = field(metadata=_wire("sid", _string))
    conn: str = field(metadata=_wire("c", _string))
    """The relayed connection's id, which every message about that stream names."""
    sender: str = field(metadata=_wire("f", _string))
    """The relaying worker's id."""
    arrived: int = field(metadata=_wire("at", _count))
    """The resume's arrival number, drawn from the session's claim sequence."""


@dataclass(frozen=True, slots=True)
class Attach:
    """The relaying worker asks the owner to stream the session's events after the token
    ``after`` to it (once its claim's turn comes), as :class:`Chunk` messages."""

    kind: ClassVar[str] = "attach"
    session_id: str = field(metadata=_wire("sid", _string))
    conn: str = field(metadata=_wire("c", _string))
    sender: str = field(metadata=_wire("f", _string))
    after: str = field(metadata=_wire("a", _string))
    """The event id the client resumed after."""
    arrived: int = field(metadata=_wire("at", _count))


@dataclass(frozen=True, slots=True)
class Chunk:
    """Owner to relaying worker: SSE bytes of a relayed stream, numbered from 1; the next is sent
    once this one is acknowledged (:class:`Ack`)."""

    kind: ClassVar[str] = "chunk"
    conn: str = field(metadata=_wire("c", _string))
    seq: int = field(metadata=_wire("s", _count))
    body: bytes
    """The SSE bytes, to write to the client as they are."""


@dataclass(frozen=True, slots=True)
class End:
    """Owner to relaying worker: the relayed stream is over."""

    kind: ClassVar[str] = "end"
    conn: str = field(metadata=_wire("c", _string))
    graceful: bool = field(metadata=_wire("g", _flag))
    """Close the client's stream (else drop it: the client resumes)."""


@dataclass(frozen=True, slots=True)
class Ack:
    """Relaying worker to owner: chunk ``seq`` was written to the client; the owner may send the next."""

    kind: ClassVar[str] = "ack"
    conn: str = field(metadata=_wire("c", _string))
    seq: int = field(metadata=_wire("s", _count))


@dataclass(frozen=True, slots=True)
class Detach:
    """Relaying worker to owner: the relayed connection is gone (or its claim given back unused)."""

    kind: ClassVar[str] = "detach"
    conn: str = field(metadata=_wire("c", _string))


Message: TypeAlias = Post | Posted | Claim | Attach | Chunk | End | Ack | Detach
"""Any message between workers."""

_Fields = tuple[tuple[str, str, _Parse], ...]
"""A kind's header fields: attribute name, wire key, check."""

_KINDS: dict[str, tuple[type[Message], _Fields, bool]] = {
    cls.kind: (
        cls,
        tuple((f.name, f.metadata["key"], f.metadata["parse"]) for f in fields(cls) if f.name != "body"),
        any(f.name == "body" for f in fields(cls)),
    )
    for cls in (Post, Posted, Claim, Attach, Chunk, End, Ack, Detach)
}
"""Each kind's class, header fields, and whether a raw body follows the header."""


def encode(message: Message) -> bytes:
    """The wire form of ``message``; raises :class:`MessageError` if a field's value is not of
    its type (what :func:`encode` accepts, :func:`decode` reads back equal)."""
    _, spec, _ = _KINDS[message.kind]
    header: dict[str, object] = {"v": PROTOCOL_VERSION, "t": message.kind}
    for name, key, parse in spec:
        header[key] = _check(message.kind, name, key, parse, getattr(message, name))
    try:
        line = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise MessageError(f"{message.kind} message: not JSON-able: {exc}") from None
    if not isinstance(message, Post | Chunk):
        return line
    if not isinstance(message.body, bytes):
        raise MessageError(f"{message.kind} message: body must be bytes, got {type(message.body).__name__}")
    return line + b"\n" + message.body


def decode(data: bytes) -> Message:
    """The message ``data`` holds; raises :class:`MessageError` if it is malformed, of an unknown
    kind, or of another protocol version (checked first: a newer release's message is refused,
    whatever it holds)."""
    line, newline, body = data.partition(b"\n")
    try:
        header = json.loads(line, object_pairs_hook=_unique, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"not a message: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise MessageError("not a message: the header is not a JSON object")
    if "v" not in header:
        raise MessageError("not a message of this protocol: its header has no version ('v')")
    version = header.pop("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise MessageError(f"not a message: its protocol version must be an integer, got {version!r}")
    if version != PROTOCOL_VERSION:
        raise MessageError(f"refused a message of protocol version {version!r}: this worker speaks {PROTOCOL_VERSION}")
    kind = header.pop("t", None)
    if not isinstance(kind, str) or kind not in _KINDS:
        raise MessageError(f"unknown message kind {kind!r}")
    cls, spec, has_body = _KINDS[kind]
    values: dict[str, Any] = {}
    for name, key, parse in spec:
        if key not in header:
            raise MessageError(f"{kind} message: missing {key!r} ({name})")
        values[name] = _check(kind, name, key, parse, header.pop(key))
    if header:
        raise MessageError(f"{kind} message: unknown field(s) {', '.join(map(repr, header))}")
    if has_body:
        if not newline:
            raise MessageError(f"{kind} message: no newline between the header and the body")
        values["body"] = body
    elif newline:
        raise MessageError(f"{kind} message: it carries no body, but data follows its header")
    return cls(**values)


def _check(kind: str, name: str, key: str, parse: _Parse, value: object) -> Any:
    try:
        return parse(value)
    except (TypeError, ValueError) as exc:
        got = repr(value) if len(repr(value)) <= 40 else type(value).__name__
        raise MessageError(f"{kind} message: {key!r} ({name}) must be {exc}, got {got}") from None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key appears twice")
    return result


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")
