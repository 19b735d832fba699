"""POSTs for another worker's session (``cluster.forwarding``): the request the owner rebuilds from
a forwarded POST, the status it answers with, and ``Forwarding.post_elsewhere`` called on one of
two in-process workers (real uvicorns sharing a real Redis): handed over, refused for an unknown
session or another credential, and taking the session over once its owner's transport left.

The same paths over HTTP are in tests/test_scaleout.py; here the unit is ``post_elsewhere``
itself and the :class:`~mcp_sse_transport.session.Outcome` it returns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import pytest
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from redis.asyncio import Redis
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from mcp_sse_transport import ErrorCode
from mcp_sse_transport._sdk import auth_context, owner_fingerprint
from mcp_sse_transport.cluster import RedisBackplane
from mcp_sse_transport.cluster.forwarding import Forwarding, _forwarded, _forwarded_request
from mcp_sse_transport.cluster.messages import Post, decode, encode
from mcp_sse_transport.session import NOT_FOUND

from ._sdk_compat import httpx as httpx2
from ._support import RawSseStream, serving
from .test_resume import _UserFromHeader, call_stream, open_session
from .test_scaleout import worker_app

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"


def _bearer(name: str) -> AuthenticatedUser:
    return AuthenticatedUser(
        AccessToken(
            token=f"token-{name}",
            client_id=name,
            scopes=["tools", "read"],
            expires_at=2_000_000_000,
            resource="https://example.test/mcp",
        )
    )


def _post_scope(user: AuthenticatedUser | None = None) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/mcp/messages/",
        "root_path": "",
        "query_string": f"session_id={SESSION}&note=caf%C3%A9".encode(),
        "headers": [
            (b"host", b"example.test"),
            (b"content-type", b"application/json"),
            (b"x-latin", "café".encode("latin-1")),  # any byte: headers go as latin-1
            (b"x-twice", b"1"),
            (b"x-twice", b"2"),
        ],
    }
    if user is not None:
        scope["user"] = user
    return scope


def _on_the_wire(post: Post) -> Post:
    """``post`` as the owner receives it: addressed by :meth:`Forwarding.forward`, encoded, decoded."""
    message = decode(encode(replace(post, reply_to="reply", sender="worker")))
    assert isinstance(message, Post)
    return message


def test_the_owner_rebuilds_the_path_query_headers_and_body_of_a_forwarded_post() -> None:
    scope = _post_scope()
    post = _forwarded(scope, SESSION, b'{"jsonrpc":"2.0"}')
    assert (post.session_id, post.body, post.reply_to, post.sender) == (SESSION, b'{"jsonrpc":"2.0"}', "", "")
    request = _forwarded_request(_on_the_wire(post))
    assert request.method == "POST" and request.url.path == "/mcp/messages/"
    assert request.scope["query_string"] == scope["query_string"]
    assert request.query_params["session_id"] == SESSION and request.query_params["note"] == "café"
    assert request.scope["headers"] == scope["headers"], "every header, in order, byte for byte"
    assert request.headers["x-latin"] == "café" and request.headers.getlist("x-twice") == ["1", "2"]


def test_an_anonymous_post_is_rebuilt_anonymous() -> None:
    post = _forwarded(_post_scope(), SESSION, b"{}")
    assert post.user is None
    request = _forwarded_request(_on_the_wire(post))
    assert "user" not in request.scope
    assert owner_fingerprint(request.scope) == ""


def test_an_sdk_bearer_user_is_rebuilt_with_the_same_token_and_fingerprint() -> None:
    user = _bearer("alice")
    scope = _post_scope(user)
    request = _forwarded_request(_on_the_wire(_forwarded(scope, SESSION, b"{}")))
    rebuilt = request.scope["user"]
    assert isinstance(rebuilt, AuthenticatedUser) and rebuilt is not user
    assert rebuilt.access_token == user.access_token
    assert owner_fingerprint(request.scope) == owner_fingerprint(scope) != ""
    assert owner_fingerprint(request.scope) != owner_fingerprint(_post_scope(_bearer("bob")))
    with auth_context(request.scope):  # as the owner delivers it: the tools see the caller's token
        assert get_access_token() == user.access_token
    assert get_access_token() is None


# -- post_elsewhere, on two in-process workers -------------------------------------------------


@asynccontextmanager
async def _worker(redis_url: str, prefix: str) -> AsyncIterator[tuple[str, RedisBackplane, Forwarding]]:
    """tests/test_scaleout.py's worker on a real uvicorn: its URL, backplane and forwarding."""
    app = worker_app(redis_url, prefix)
    async with serving(app) as base:
        backplane = app.state.sse_transport._backplane
        assert isinstance(backplane, RedisBackplane)
        yield base, backplane, backplane._bound.forwarding


class _Body:
    """An ASGI ``receive`` that sends one body, noting whether it was read."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = json.dumps(body).encode()
        self.read = False

    async def __call__(self) -> Message:
        if self.read:
            await anyio.sleep_forever()
        self.read = True
        return {"type": "http.request", "body": self.body, "more_body": False}


async def _as_user(scope: dict[str, Any]) -> Scope:
    """``scope`` once tests/test_resume.py's ``_UserFromHeader`` authenticated it (``x-user``)."""
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    async def nothing() -> Message:
        raise AssertionError("not read")

    async def ignore(message: Message) -> None:
        raise AssertionError("not sent")

    await _UserFromHeader(app)(scope, nothing, ignore)
    return seen[0]


async def _request(session_id: str, body: _Body, user: str | None = None) -> Request:
    headers = [(b"content-type", b"application/json")]
    if user is not None:
        headers.append((b"x-user", user.encode()))
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/messages/",
        "root_path": "",
        "query_string": f"session_id={session_id}".encode(),
        "headers": headers,
    }
    return Request(await _as_user(scope), body)


async def _answer(raw: RawSseStream, request_id: int) -> dict[str, Any]:
    """Read the stream up to the answer to ``request_id``; fails on another request's answer."""
    while True:
        event = await raw.next_event()
        assert event is not None, "the stream ended before the answer"
        body = event.json()
        if "id" in body and "method" not in body:
            assert body["id"] == request_id, f"an answer to {body['id']} came first"
            assert isinstance(body, dict)
            return body


def _session_of(post_url: str) -> str:
    return post_url.split("session_id=")[1]


async def test_a_post_for_the_owners_session_is_handed_over_and_answered_with_its_status(
    redis_url: str, redis_prefix: str
) -> None:
    with anyio.fail_after(30):
        async with (
            _worker(redis_url, redis_prefix) as (a, owner, _),
            _worker(redis_url, redis_prefix) as (_, b, sender),
        ):
            async with httpx2.AsyncClient(base_url=a) as http, RawSseStream.open(a) as raw:
                post_url, _ = await open_session(raw, http, retry_ms=50)
                session_id = _session_of(post_url)

                accepted = await sender.post_elsewhere(session_id, await _request(session_id, _Body(call_stream(2))))
                assert (accepted.status, accepted.text) == (202, "Accepted")
                assert (await _answer(raw, 1))["result"]["content"][0]["text"] == "streamed 2"

                malformed = _Body({"jsonrpc": "2.0", "id": 7, "method": 5})
                refused = await sender.post_elsewhere(session_id, await _request(session_id, malformed))
                assert (refused.status, refused.text) == (400, "Could not parse message"), "the owner's status"
                assert owner.serves(session_id) and not b.serves(session_id), "handed over, not taken over"


async def test_a_post_for_an_unknown_session_is_not_found_before_its_body_is_read(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    with anyio.fail_after(30):
        async with _worker(redis_url, redis_prefix) as (_, backplane, forwarding):
            body = _Body(call_stream(1))
            outcome = await forwarding.post_elsewhere(SESSION, await _request(SESSION, body))
            assert outcome is NOT_FOUND and not body.read
            assert [key async for key in redis_client.scan_iter(match=f"{redis_prefix}{{{SESSION}}}:*")] == []
            assert not backplane.serves(SESSION)


async def test_a_post_with_another_credential_is_not_found_and_not_delivered(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    with anyio.fail_after(30):
        async with _worker(redis_url, redis_prefix) as (a, _, _), _worker(redis_url, redis_prefix) as (_, _, sender):
            alice = {"x-user": "alice"}
            async with (
                httpx2.AsyncClient(base_url=a, headers=alice) as http,
                RawSseStream.open(a, headers=alice) as raw,
            ):
                post_url, _ = await open_session(raw, http, retry_ms=50)
                session_id = _session_of(post_url)
                body = _Body({**call_stream(1), "id": 5})
                refused = await sender.post_elsewhere(session_id, await _request(session_id, body, user="bob"))
                assert refused is NOT_FOUND and not body.read
                anonymous = await sender.post_elsewhere(session_id, await _request(session_id, _Body(call_stream(1))))
                assert anonymous is NOT_FOUND
                # Alice's own request, through the same worker, is the first the session answers.
                alices = _Body({**call_stream(1), "id": 6})
                accepted = await sender.post_elsewhere(session_id, await _request(session_id, alices, user="alice"))
                assert accepted.status == 202
                assert (await _answer(raw, 6))["result"]["content"][0]["text"] == "streamed 1"
                seen = await redis_client.hkeys(f"{redis_prefix}{{{session_id}}}:seen")
                assert sorted(seen) == [b"0", b"6"], "initialize and alice's call: bob's was never delivered"


async def test_a_post_whose_owner_left_takes_the_session_over_and_is_delivered(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    with anyio.fail_after(30):
        async with _worker(redis_url, redis_prefix) as (b, backplane, forwarding):
            async with _worker(redis_url, redis_prefix) as (a, _, _):
                async with httpx2.AsyncClient(base_url=a) as http, RawSseStream.open(a) as raw:
                    post_url, first_id = await open_session(raw, http, retry_ms=50)
            # a's transport left: it handed the session off, its lease given up.
            session_id = _session_of(post_url)
            assert await redis_client.get(f"{redis_prefix}{{{session_id}}}:owner") is None
            assert not backplane.serves(session_id)

            outcome = await forwarding.post_elsewhere(session_id, await _request(session_id, _Body(call_stream(3))))
            assert (outcome.status, outcome.text) == (202, "Accepted")
            assert backplane.serves(session_id)
            owner = await redis_client.get(f"{redis_prefix}{{{session_id}}}:owner")
            assert owner == backplane._bus.worker_id.encode()
            async with RawSseStream.open(b, headers={"Last-Event-ID": first_id}) as resumed:
                endpoint = await resumed.next_event()
                assert endpoint is not None and endpoint.event == "endpoint" and endpoint.data == post_url
                assert (await _answer(resumed, 0))["result"]["serverInfo"]["name"] == "resume", "from a's era"
                assert (await _answer(resumed, 1))["result"]["content"][0]["text"] == "streamed 3"


async def test_the_owners_answer_reaches_the_sender_as_the_owner_gave_it(redis_url: str, redis_prefix: str) -> None:
    """Status, body and ``Retry-After`` alike: a request id over the limit gets the owner's
    JSON-RPC error through another worker, not a text rebuilt from its status."""
    with anyio.fail_after(30):
        async with (
            _worker(redis_url, redis_prefix) as (a, _, _),
            _worker(redis_url, redis_prefix) as (_, _, sender),
        ):
            async with httpx2.AsyncClient(base_url=a) as http, RawSseStream.open(a) as raw:
                post_url, _ = await open_session(raw, http, retry_ms=50)
                session_id = _session_of(post_url)
                long_id = _Body({"jsonrpc": "2.0", "id": "x" * 300, "method": "ping"})
                direct = await http.post(post_url, content=long_id.body, headers={"content-type": "application/json"})
                refused = await sender.post_elsewhere(session_id, await _request(session_id, long_id))
    assert (refused.status, refused.json, refused.retry) == (400, True, False)
    assert refused.text == direct.text and json.loads(refused.text)["error"]["code"] == ErrorCode.INVALID_REQUEST
