"""The messages between workers: round trips, a golden wire form per kind, malformed input refused."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_sse_transport.cluster.messages import (
    PROTOCOL_VERSION,
    Ack,
    Attach,
    Chunk,
    Claim,
    Detach,
    End,
    Message,
    MessageError,
    Post,
    Posted,
    decode,
    encode,
)

TOKEN = {"token": "t0k", "client_id": "c", "scopes": ["read"], "expires_at": None}


def post(body: bytes = b'{"jsonrpc":"2.0","id":1,"method":"ping"}', **changes: object) -> Post:
    message = Post(
        session_id="sess",
        path="/messages/",
        query="session_id=sess",
        headers=(("content-type", "application/json"), ("host", "example")),
        user=TOKEN,
        reply_to="r1",
        sender="w1",
        body=body,
    )
    return dataclasses.replace(message, **changes)  # type: ignore[arg-type]


GOLDEN: list[tuple[Message, bytes]] = [
    (
        post(),
        b'{"v":1,"t":"post","sid":"sess","p":"/messages/","q":"session_id=sess",'
        b'"h":[["content-type","application/json"],["host","example"]],'
        b'"u":{"token":"t0k","client_id":"c","scopes":["read"],"expires_at":null},"r":"r1","f":"w1"}'
        b'\n{"jsonrpc":"2.0","id":1,"method":"ping"}',
    ),
    (
        Posted(reply_to="r1", status=503, text="Too many requests in flight", retry=True),
        b'{"v":1,"t":"posted","r":"r1","s":503,"x":"Too many requests in flight","j":false,"y":true}',
    ),
    (
        Claim(session_id="sess", conn="c1", sender="w2", arrived=7),
        b'{"v":1,"t":"claim","sid":"sess","c":"c1","f":"w2","at":7}',
    ),
    (
        Attach(session_id="sess", conn="c1", sender="w2", after="sec:42", arrived=7),
        b'{"v":1,"t":"attach","sid":"sess","c":"c1","f":"w2","a":"sec:42","at":7}',
    ),
    (Chunk(conn="c1", seq=3, body=b"id: 1\ndata: x\n\n"), b'{"v":1,"t":"chunk","c":"c1","s":3}\nid: 1\ndata: x\n\n'),
    (End(conn="c1", graceful=True), b'{"v":1,"t":"end","c":"c1","g":true}'),
    (End(conn="c1", graceful=False), b'{"v":1,"t":"end","c":"c1","g":false}'),
    (Ack(conn="c1", seq=3), b'{"v":1,"t":"ack","c":"c1","s":3}'),
    (Detach(conn="c1"), b'{"v":1,"t":"detach","c":"c1"}'),
]


@pytest.mark.parametrize(("message", "wire"), GOLDEN, ids=lambda value: getattr(value, "kind", ""))
def test_golden_wire_form(message: Message, wire: bytes) -> None:
    assert encode(message) == wire
    assert decode(wire) == message


def test_every_kind_has_a_golden_example() -> None:
    assert {type(message) for message, _ in GOLDEN} == {Post, Posted, Claim, Attach, Chunk, End, Ack, Detach}
    assert PROTOCOL_VERSION == 1


ROUND_TRIPS: list[Message] = [
    post(body=b""),
    post(body=b"\n"),
    post(body=b"line one\nline two\r\n\n"),
    post(body=bytes(range(256))),
    post(body=b"\xff\xfe\x00\x80 not utf-8"),
    post(user=None, headers=(), query=""),
    post(path="/m\u00e9ssages/\u2603/\U0001f600", headers=(("x-name", "caf\u00e9 \u00ff"), ("x-nl", "a\nb"))),
    post(session_id="s\nid", sender='w"1\\', reply_to="\u2028"),
    post(user={"nested": {"list": [1, 2.5, True, None, "\u00e9"]}, "": "empty key"}),
    Chunk(conn="c", seq=0, body=b""),
    Chunk(conn="c", seq=10**18, body=b"\n\n\xff\n"),
    Ack(conn="c", seq=0),
    Claim(session_id="s", conn="c", sender="f", arrived=0),
    Attach(session_id="s", conn="c", sender="f", after="", arrived=1),
    Posted(reply_to="r", status=421),
    Posted(reply_to="r", status=500),
]


@pytest.mark.parametrize("message", ROUND_TRIPS)
def test_round_trip(message: Message) -> None:
    data = encode(message)
    assert decode(data) == message
    header, newline, body = data.partition(b"\n")
    assert header.isascii()  # one line: newlines and non-ASCII in strings are escaped
    if isinstance(message, Post | Chunk):
        assert body == message.body  # raw, never escaped
    else:
        assert not newline


@given(body=st.binary(), text=st.text(), pairs=st.lists(st.tuples(st.text(), st.text()), max_size=4))
def test_round_trip_any_bytes_and_text(body: bytes, text: str, pairs: list[tuple[str, str]]) -> None:
    for message in (post(body=body, path=text, query=text, headers=tuple(pairs)), Chunk(conn=text, seq=1, body=body)):
        data = encode(message)
        assert data.endswith(b"\n" + body)
        assert decode(data) == message


def test_messages_are_frozen_and_slotted() -> None:
    message = Ack(conn="c", seq=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.seq = 2  # type: ignore[misc]
    assert not hasattr(message, "__dict__")


MALFORMED: list[tuple[bytes, str]] = [
    (b"", "not JSON"),
    (b"not json", "not JSON"),
    (b'{"v":1,"t":"ack","c":"c","s":1', "not JSON"),
    (b"\xff\xfe{}", "not JSON"),
    (b'{"v":1,"t":"ack","c":"c","s":NaN}', "not JSON"),
    (b'{"v":1,"t":"detach","c":"a","c":"b"}', "twice"),
    (b'[1,"ack"]', "not a JSON object"),
    (b'"ack"', "not a JSON object"),
    (b'{"t":"ack","c":"c","s":1}', "no version"),
    (b'{"v":"1","t":"ack","c":"c","s":1}', "must be an integer"),
    (b'{"v":1.0,"t":"ack","c":"c","s":1}', "must be an integer"),
    (b'{"v":null,"t":"ack","c":"c","s":1}', "must be an integer"),
    (b'{"v":true,"t":"ack","c":"c","s":1}', "must be an integer"),
    (b'{"v":2,"t":"ack","c":"c","s":1}', "protocol version 2"),
    (b'{"v":0,"t":"ack","c":"c","s":1}', "protocol version 0"),
    (b'{"v":2,"t":"brand-new","x":[]}\nwhatever', "protocol version 2"),  # the version is checked first
    (b'{"v":1,"t":"nudge","c":"c"}', "unknown message kind 'nudge'"),
    (b'{"v":1,"c":"c"}', "unknown message kind None"),
    (b'{"v":1,"t":["ack"],"c":"c"}', "unknown message kind"),
    (b'{"v":1,"t":"ack","c":"c"}', "missing 's' (seq)"),
    (b'{"v":1,"t":"post","sid":"s","p":"/","q":"","h":[],"r":"r","f":"f"}\n', "missing 'u' (user)"),
    (b'{"v":1,"t":"ack","c":"c","s":1,"x":2}', "unknown field(s) 'x'"),
    (b'{"v":1,"t":"ack","c":1,"s":1}', "'c' (conn) must be a string"),
    (b'{"v":1,"t":"ack","c":"c","s":"1"}', "'s' (seq) must be a non-negative integer"),
    (b'{"v":1,"t":"ack","c":"c","s":1.5}', "non-negative integer"),
    (b'{"v":1,"t":"ack","c":"c","s":-1}', "non-negative integer"),
    (b'{"v":1,"t":"chunk","c":"c","s":true}\n', "non-negative integer"),
    (b'{"v":1,"t":"posted","r":"r","s":"200"}', "'s' (status) must be an HTTP status"),
    (b'{"v":1,"t":"posted","r":"r","s":200.0}', "HTTP status"),
    (b'{"v":1,"t":"posted","r":"r","s":99}', "HTTP status"),
    (b'{"v":1,"t":"posted","r":"r","s":false}', "HTTP status"),
    (b'{"v":1,"t":"end","c":"c","g":1}', "'g' (graceful) must be a boolean"),
    (b'{"v":1,"t":"end","c":"c","g":"true"}', "boolean"),
    (b'{"v":1,"t":"end","c":"c","g":null}', "boolean"),
    (b'{"v":1,"t":"claim","sid":"s","c":"c","f":"f","at":null}', "'at' (arrived)"),
    (b'{"v":1,"t":"attach","sid":"s","c":"c","f":"f","a":5,"at":1}', "'a' (after) must be a string"),
    (b'{"v":1,"t":"chunk","c":"c","s":1}', "no newline between the header and the body"),
    (b'{"v":1,"t":"ack","c":"c","s":1}\n', "carries no body"),
    (b'{"v":1,"t":"detach","c":"c"}\nextra', "carries no body"),
]


def _post_header(field: str) -> bytes:
    return b'{"v":1,"t":"post","sid":"s","p":"/","q":"",' + field.encode() + b',"r":"r","f":"f"}\nbody'


MALFORMED += [
    (_post_header('"h":{"a":"b"},"u":null'), "'h' (headers) must be a list of [name, value] string pairs"),
    (_post_header('"h":"a: b","u":null'), "string pairs"),
    (_post_header('"h":[["a"]],"u":null'), "string pairs"),
    (_post_header('"h":[["a","b","c"]],"u":null'), "string pairs"),
    (_post_header('"h":[["a",1]],"u":null'), "string pairs"),
    (_post_header('"h":[{"a":"b"}],"u":null'), "string pairs"),
    (_post_header('"h":[],"u":"token"'), "'u' (user) must be an object or null"),
    (_post_header('"h":[],"u":["token"]'), "object or null"),
]


@pytest.mark.parametrize(("data", "reason"), MALFORMED)
def test_malformed_refused(data: bytes, reason: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode(data)
    assert reason in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_deeply_nested_header_refused() -> None:
    with pytest.raises(MessageError, match="not JSON"):
        decode(b"[" * 100_000 + b"]" * 100_000)


def test_older_unversioned_wire_form_refused() -> None:
    """What workers sent before messages were versioned: refused, not misread."""
    with pytest.raises(MessageError, match="no version"):
        decode(b'{"t":"chunk","c":"c1","s":1}\ndata: x\n\n')


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (Ack(conn="c", seq=-1), "non-negative integer"),
        (Ack(conn="c", seq=True), "non-negative integer"),
        (End(conn="c", graceful=1), "boolean"),  # type: ignore[arg-type]
        (Posted(reply_to="r", status=600), "HTTP status"),
        (Detach(conn=None), "must be a string"),  # type: ignore[arg-type]
        (post(headers=(("a", b"b"),)), "string pairs"),
        (post(user={"when": object()}), "not JSON-able"),
        (post(user={"x": float("nan")}), "not JSON-able"),
        (post(user={1: "x"}), "object or null"),
        (post(body="text"), "body must be bytes"),  # type: ignore[arg-type]
        (Chunk(conn="c", seq=1, body=bytearray(b"x")), "body must be bytes"),  # type: ignore[arg-type]
    ],
)
def test_encode_refuses_what_decode_would(message: Message, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        encode(message)
