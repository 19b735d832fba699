"""The SDK adapter, ``_sdk``: parsing and serialization, restored handshakes, stream pairs, message
metadata, the owner fingerprint and auth context, and an ``MCPServer``'s wiring. All against the
real SDK and Starlette types; nothing here needs a socket."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.shared.message import ClientMessageMetadata
from pydantic import AnyHttpUrl
from starlette.authentication import BaseUser, SimpleUser, UnauthenticatedUser
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mcp_sse_transport import _sdk
from mcp_sse_transport._sdk import (
    MCPServer,
    Server,
    ServerMessageMetadata,
    SessionMessage,
    ValidationError,
    session_message,
    types,
)
from mcp_sse_transport._sdk._fastmcp import is_fastmcp

from ._sdk_compat import lowlevel_of, needs_mcp2, snake

# -- parse ---------------------------------------------------------------------------------------


def test_parse_reads_a_request() -> None:
    message = _sdk.parse(b'{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{"cursor":"c"}}')
    assert isinstance(message, types.JSONRPCRequest)
    assert (message.id, message.method, message.params) == (7, "tools/list", {"cursor": "c"})


def test_parse_reads_a_notification_from_str() -> None:
    message = _sdk.parse('{"jsonrpc":"2.0","method":"notifications/initialized"}')
    assert isinstance(message, types.JSONRPCNotification)
    assert message.method == "notifications/initialized"


def test_parse_reads_a_response_and_an_error() -> None:
    response = _sdk.parse(b'{"jsonrpc":"2.0","id":"a","result":{"ok":true}}')
    assert isinstance(response, types.JSONRPCResponse)
    assert (response.id, response.result) == ("a", {"ok": True})
    error = _sdk.parse(b'{"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"no such method"}}')
    assert isinstance(error, types.JSONRPCError)
    assert (error.id, error.error.code, error.error.message) == (3, -32601, "no such method")


@pytest.mark.parametrize(
    "body",
    [b"not json", b"{}", b"[]", b'{"jsonrpc":"1.0","id":1,"method":"ping"}', b'{"jsonrpc":"2.0","id":1}'],
)
def test_parse_raises_pydantics_validation_error_for_an_invalid_body(body: bytes) -> None:
    with pytest.raises(ValidationError):
        _sdk.parse(body)


def test_the_validation_error_is_pydantics() -> None:
    import pydantic

    assert ValidationError is pydantic.ValidationError


# -- serialize, dump -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"x":[1,2]}}}',
        '{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":0.5}}',
        '{"jsonrpc":"2.0","id":"r-1","result":{"content":[]}}',
        '{"jsonrpc":"2.0","id":2,"error":{"code":-32000,"message":"closed","data":{"why":"x"}}}',
    ],
)
def test_serialize_and_dump_round_trip_through_parse(body: str) -> None:
    message = _sdk.parse(body)
    data = _sdk.serialize(message)
    assert isinstance(data, bytes)
    assert json.loads(data) == json.loads(body)
    assert _sdk.parse(data) == message
    text = _sdk.dump(message)
    assert isinstance(text, str)
    assert text.encode() == data, "dump is serialize as text"


@needs_mcp2("exclude_unset serialization: 1.x serializes with exclude_none, dropping an explicit None too")
def test_serialize_and_dump_leave_out_unset_fields() -> None:
    request = types.JSONRPCRequest(jsonrpc="2.0", id=1, method="ping")
    error = types.JSONRPCError(jsonrpc="2.0", id=1, error=types.ErrorData(code=-1, message="m"))
    assert json.loads(_sdk.serialize(request)) == {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    assert json.loads(_sdk.dump(request)) == {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    assert "data" not in json.loads(_sdk.serialize(error))["error"]
    explicit = types.JSONRPCRequest(jsonrpc="2.0", id=1, method="ping", params=None)
    assert json.loads(_sdk.serialize(explicit)) == {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": None}


def test_serialize_raises_value_error_for_what_pydantic_cannot_serialize() -> None:
    message = types.JSONRPCResponse(jsonrpc="2.0", id=1, result={"x": object()})
    with pytest.raises(ValueError, match="serialize"):
        _sdk.serialize(message)


# -- jsonrpc_error, answered_id ------------------------------------------------------------------


def test_jsonrpc_error_names_the_id_code_and_message() -> None:
    error = _sdk.jsonrpc_error("req-1", "Request is too large", -32057)
    assert isinstance(error, types.JSONRPCError)
    assert json.loads(_sdk.dump(error)) == {
        "jsonrpc": "2.0",
        "id": "req-1",
        "error": {"code": -32057, "message": "Request is too large"},
    }


def test_answered_id_is_the_id_of_a_response_or_error_only() -> None:
    assert _sdk.answered_id(types.JSONRPCResponse(jsonrpc="2.0", id=5, result={})) == 5
    assert _sdk.answered_id(_sdk.jsonrpc_error("e", "m", -1)) == "e"
    assert _sdk.answered_id(types.JSONRPCRequest(jsonrpc="2.0", id=5, method="ping")) is None
    assert _sdk.answered_id(types.JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized")) is None


# -- handshakes ----------------------------------------------------------------------------------


def test_speaks_handshake_for_the_sdks_handshake_versions_only() -> None:
    assert _sdk.speaks_handshake("2025-06-18")
    assert _sdk.speaks_handshake("2024-11-05")
    assert not _sdk.speaks_handshake("1999-01-01")
    assert not _sdk.speaks_handshake("")


def test_restored_handshake_is_an_initialize_and_initialized_for_the_version() -> None:
    initialize, initialized = _sdk.restored_handshake("2025-06-18")
    assert isinstance(initialize, types.JSONRPCRequest)
    assert initialize.method == "initialize"
    assert initialize.id == _sdk.RESTORED_REQUEST_ID == "mcp-sse-transport/restore"
    params = initialize.params
    assert params is not None
    assert params["protocolVersion"] == "2025-06-18"
    assert params["capabilities"] == {}, "no roots, sampling or elicitation the client may not have"
    assert params["clientInfo"] == {"name": "mcp-sse-transport-restored-session", "version": "0"}
    assert isinstance(initialized, types.JSONRPCNotification)
    assert initialized.method == "notifications/initialized"


def test_restored_handshake_is_valid_mcp() -> None:
    initialize, initialized = _sdk.restored_handshake("2025-03-26")
    assert initialize.params is not None
    request = snake(types.InitializeRequestParams.model_validate(initialize.params))
    assert request.protocol_version == "2025-03-26"
    assert request.client_info.name == "mcp-sse-transport-restored-session"
    assert _sdk.parse(_sdk.serialize(initialize)) == initialize
    assert _sdk.parse(_sdk.serialize(initialized)) == initialized


# -- streams, servers ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_server_streams_carry_a_sent_message_to_the_read_stream() -> None:
    inbound, read_stream = _sdk.server_streams()
    message = session_message(types.JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized"))
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(inbound.send, message)
            assert await read_stream.receive() is message
    inbound.close()
    read_stream.close()


@pytest.mark.anyio
async def test_server_streams_are_unbuffered() -> None:
    inbound, read_stream = _sdk.server_streams()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            sent = anyio.Event()

            async def send() -> None:
                await inbound.send(ValueError("bad body"))
                sent.set()

            tg.start_soon(send)
            await anyio.wait_all_tasks_blocked()
            assert not sent.is_set(), "a send waits for the server to read"
            item = await read_stream.receive()
            await sent.wait()
    assert isinstance(item, ValueError)
    inbound.close()
    read_stream.close()


@pytest.mark.anyio
async def test_ended_streams_end_reads_and_refuse_writes() -> None:
    read_stream, write_stream = _sdk.ended_streams()
    message = session_message(types.JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized"))
    with anyio.fail_after(5):
        with pytest.raises(anyio.EndOfStream):
            await read_stream.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await write_stream.send(message)
    await read_stream.aclose()
    await write_stream.aclose()


def test_lowlevel_server_of_an_mcp_server_is_its_lowlevel_server() -> None:
    server = MCPServer("adapted")
    lowlevel = _sdk.lowlevel_server(server)
    assert isinstance(lowlevel, Server)
    assert lowlevel is lowlevel_of(server)
    assert lowlevel.name == "adapted"


def test_lowlevel_server_of_a_lowlevel_server_is_itself() -> None:
    server: Server[Any] = Server("plain")
    assert _sdk.lowlevel_server(server) is server


# -- metadata ------------------------------------------------------------------------------------


def _request(scope: dict[str, Any] | None = None) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/messages/", "headers": [], **(scope or {})})


@needs_mcp2("on_request_unanswered on ServerMessageMetadata (1.x answers every request itself)")
def test_metadata_carries_the_request_and_no_unanswered_hook_by_default() -> None:
    request = _request()
    result = _sdk.metadata(request)
    assert result.request_context is request
    assert result.on_request_unanswered is None


@needs_mcp2("on_request_unanswered on ServerMessageMetadata (1.x answers every request itself)")
@pytest.mark.anyio
async def test_metadata_sets_the_unanswered_hook() -> None:
    ran = anyio.Event()

    async def unanswered() -> None:
        ran.set()

    result = _sdk.metadata(_request(), unanswered)
    assert result.on_request_unanswered is unanswered
    with anyio.fail_after(5):
        await result.on_request_unanswered()
    assert ran.is_set()


@needs_mcp2("can_send_request nor on_request_unanswered on ServerMessageMetadata")
def test_metadata_carries_no_close_callbacks_and_allows_server_requests_by_default() -> None:
    result = _sdk.metadata(_request())
    assert result.close_sse_stream is None
    assert result.close_standalone_sse_stream is None
    assert result.can_send_request is True
    assert result.related_request_id is None


@needs_mcp2("can_send_request nor on_request_unanswered on ServerMessageMetadata")
@pytest.mark.anyio
async def test_metadata_carries_the_close_callbacks_and_can_send_request() -> None:
    closed: list[str] = []

    async def close_stream() -> None:
        closed.append("stream")

    async def close_standalone() -> None:
        closed.append("standalone")

    result = _sdk.metadata(
        _request(), close_stream=close_stream, close_standalone=close_standalone, can_send_request=False
    )
    assert result.close_sse_stream is close_stream
    assert result.close_standalone_sse_stream is close_standalone
    assert result.can_send_request is False
    assert result.on_request_unanswered is None
    with anyio.fail_after(5):
        await result.close_sse_stream()
        await result.close_standalone_sse_stream()
    assert closed == ["stream", "standalone"]


def test_related_request_id_is_the_servers_metadata_s_related_request() -> None:
    notification = types.JSONRPCNotification(jsonrpc="2.0", method="notifications/progress")
    for related in (5, "a"):
        item = session_message(notification, metadata=ServerMessageMetadata(related_request_id=related))
        assert _sdk.related_request_id(item) == related
    assert _sdk.related_request_id(session_message(notification, metadata=ServerMessageMetadata())) is None
    assert _sdk.related_request_id(session_message(notification)) is None
    client_side = ClientMessageMetadata(resumption_token="t")
    assert (
        _sdk.related_request_id(SessionMessage(_sdk.session_message(notification).message, metadata=client_side))
        is None
    )


@pytest.mark.parametrize("version", [None, "2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"])
def test_handshake_era_for_no_header_and_the_sdks_handshake_versions(version: str | None) -> None:
    assert _sdk.handshake_era(version)


@pytest.mark.parametrize("version", ["2026-07-28", "2099-01-01", "garbage", ""])
def test_handshake_era_not_for_any_other_version(version: str) -> None:
    """On 2.x those go to the SDK's single-exchange entry, which validates them; 1.x has no other
    era, and its own manager would open sessions outside ours for them: all are ours."""
    assert _sdk.handshake_era(version) is (_sdk.MAJOR < 2)


@pytest.mark.parametrize(
    ("version", "primes"),
    [
        ("2024-11-05", False),
        ("2025-03-26", False),
        ("2025-06-18", False),
        ("2025-11-25", True),
        ("2026-07-28", True),
    ],
)
def test_primes_streams_from_2025_11_25_on(version: str, primes: bool) -> None:
    assert _sdk.primes_streams(version) is primes


# -- owner_fingerprint ---------------------------------------------------------------------------


def _token(**changes: Any) -> AccessToken:
    values: dict[str, Any] = {"token": "t-1", "client_id": "client", "scopes": ["tools"], "subject": "alice"}
    values.update(changes)
    return AccessToken(**values)


def _scope(user: BaseUser | None) -> Scope:
    return {"type": "http"} if user is None else {"type": "http", "user": user}


def test_owner_fingerprint_is_empty_when_anonymous() -> None:
    assert _sdk.owner_fingerprint(_scope(None)) == ""


def test_owner_fingerprint_is_empty_for_an_unauthenticated_user() -> None:
    assert _sdk.owner_fingerprint(_scope(UnauthenticatedUser())) == ""


def test_owner_fingerprint_of_a_bearer_user_is_a_sha256_hex_digest_stable_across_calls() -> None:
    first = _sdk.owner_fingerprint(_scope(AuthenticatedUser(_token())))
    again = _sdk.owner_fingerprint(_scope(AuthenticatedUser(_token())))
    assert len(first) == 64
    assert int(first, 16) >= 0
    assert first == again


@pytest.mark.parametrize(
    "changes",
    [
        {"client_id": "other-client"},
        {"subject": "bob"},
        {"subject": None},
        {"claims": {"iss": "https://other.example"}},
    ],
)
def test_owner_fingerprint_tells_bearer_principals_apart(changes: dict[str, Any]) -> None:
    if not set(changes) <= set(AccessToken.model_fields):
        pytest.skip(f"this mcp's AccessToken has no {sorted(set(changes) - set(AccessToken.model_fields))} (1.28 on)")
    mine = _sdk.owner_fingerprint(_scope(AuthenticatedUser(_token())))
    theirs = _sdk.owner_fingerprint(_scope(AuthenticatedUser(_token(**changes))))
    assert theirs not in ("", mine)


def test_owner_fingerprint_of_a_bearer_user_is_its_principal_not_its_token() -> None:
    """What the implementation (and the README: "client id, issuer and subject") fingerprint:
    the SDK's ``authorization_context``; a refreshed token of the same principal, with other
    scopes or other non-issuer claims, owns the same sessions."""
    mine = _sdk.owner_fingerprint(_scope(AuthenticatedUser(_token())))
    refreshed = _token(token="t-2", scopes=["tools", "admin"], expires_at=99, claims={"act": "x"})
    assert _sdk.owner_fingerprint(_scope(AuthenticatedUser(refreshed))) == mine


def test_owner_fingerprint_of_a_starlette_user_is_its_class_and_identity() -> None:
    alice = _sdk.owner_fingerprint(_scope(SimpleUser("alice")))
    assert alice not in ("", _sdk.owner_fingerprint(_scope(SimpleUser("bob"))))
    assert alice == _sdk.owner_fingerprint(_scope(SimpleUser("alice")))

    class OtherUser(SimpleUser):
        pass

    assert _sdk.owner_fingerprint(_scope(OtherUser("alice"))) not in ("", alice), "another class, another owner"


def test_owner_fingerprint_of_a_user_without_identity_uses_its_display_name() -> None:
    class NamedUser(BaseUser):
        def __init__(self, name: str) -> None:
            self.name = name

        @property
        def is_authenticated(self) -> bool:
            return True

        @property
        def display_name(self) -> str:
            return self.name

    carol = _sdk.owner_fingerprint(_scope(NamedUser("carol")))
    assert carol not in ("", _sdk.owner_fingerprint(_scope(NamedUser("dave"))))


def test_owner_fingerprint_of_a_bearer_user_differs_from_a_simple_user_of_its_client_id() -> None:
    bearer = _sdk.owner_fingerprint(_scope(AuthenticatedUser(_token())))
    simple = _sdk.owner_fingerprint(_scope(SimpleUser("client")))
    assert bearer != simple


# -- user_token, forwarded_user, auth_context ----------------------------------------------------


def test_user_token_is_none_without_a_bearer_user() -> None:
    assert _sdk.user_token(_scope(None)) is None
    assert _sdk.user_token(_scope(SimpleUser("alice"))) is None


def test_user_token_and_forwarded_user_round_trip() -> None:
    token = _token(expires_at=1234, resource="https://mcp.example", claims={"iss": "https://auth.example"})
    user = AuthenticatedUser(token)
    described = _sdk.user_token(_scope(user))
    assert described is not None
    assert json.loads(json.dumps(described)) == described, "plain JSON, for a message between workers"
    rebuilt = _sdk.forwarded_user(described)
    assert isinstance(rebuilt, AuthenticatedUser)
    assert rebuilt.access_token == token
    assert rebuilt.scopes == ["tools"]
    assert rebuilt.username == "client"
    assert _sdk.owner_fingerprint(_scope(rebuilt)) == _sdk.owner_fingerprint(_scope(user))


def test_auth_context_sets_and_resets_the_sdks_auth_context_var() -> None:
    user = AuthenticatedUser(_token())
    assert auth_context_var.get() is None
    with _sdk.auth_context(_scope(user)):
        assert auth_context_var.get() is user
    assert auth_context_var.get() is None


def test_auth_context_leaves_the_var_alone_without_a_bearer_user() -> None:
    with _sdk.auth_context(_scope(SimpleUser("alice"))):
        assert auth_context_var.get() is None
    with _sdk.auth_context(_scope(None)):
        assert auth_context_var.get() is None


def test_auth_context_nests() -> None:
    outer = AuthenticatedUser(_token())
    inner = AuthenticatedUser(_token(client_id="inner"))
    with _sdk.auth_context(_scope(outer)):
        with _sdk.auth_context(_scope(inner)):
            assert auth_context_var.get() is inner
        assert auth_context_var.get() is outer
        with _sdk.auth_context(_scope(None)):
            assert auth_context_var.get() is outer, "an anonymous scope inside keeps the outer user"
    assert auth_context_var.get() is None


def test_auth_context_resets_when_the_body_raises() -> None:
    user = AuthenticatedUser(_token())
    with pytest.raises(RuntimeError, match="boom"), _sdk.auth_context(_scope(user)):
        raise RuntimeError("boom")
    assert auth_context_var.get() is None


# -- server_wiring -------------------------------------------------------------------------------


async def _sse_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("never called")


async def _post_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("never called")


class _Tokens:
    """The SDK's TokenVerifier protocol."""

    async def verify_token(self, token: str) -> AccessToken | None:
        return _token(token=token) if token == "good" else None


def test_server_wiring_of_a_lowlevel_server_changes_nothing() -> None:
    sse, post, routes, middleware = _sdk.server_wiring(Server("plain"), _sse_endpoint, _post_endpoint)
    assert sse is _sse_endpoint
    assert post is _post_endpoint
    assert routes == []
    assert middleware == []


def test_server_wiring_of_an_mcp_server_without_auth_adds_its_custom_routes_only() -> None:
    server = MCPServer("custom")

    @server.custom_route("/health", methods=["GET"])  # type: ignore[untyped-decorator]
    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    sse, post, routes, middleware = _sdk.server_wiring(server, _sse_endpoint, _post_endpoint)
    assert (sse, post) == (_sse_endpoint, _post_endpoint)
    assert middleware == []
    assert [route.path for route in routes if isinstance(route, Route)] == ["/health"]


def test_server_wiring_with_a_token_verifier_guards_the_endpoints_and_adds_auth_middleware() -> None:
    auth = AuthSettings(
        issuer_url=AnyHttpUrl("https://auth.example"),
        resource_server_url=AnyHttpUrl("https://mcp.example"),
        required_scopes=["tools"],
        validate_token_resource=False,
    )
    server = MCPServer("guarded", token_verifier=_Tokens(), auth=auth)

    @server.custom_route("/health", methods=["GET"])  # type: ignore[untyped-decorator]
    async def health(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    sse, post, routes, middleware = _sdk.server_wiring(server, _sse_endpoint, _post_endpoint)
    for guarded, endpoint in ((sse, _sse_endpoint), (post, _post_endpoint)):
        assert isinstance(guarded, RequireAuthMiddleware)
        assert guarded.app is endpoint
        assert guarded.required_scopes == ["tools"]
        assert guarded.resource_metadata_url is not None
        assert "oauth-protected-resource" in str(guarded.resource_metadata_url)
    classes: list[object] = [entry.cls for entry in middleware]
    assert classes == [AuthenticationMiddleware, AuthContextMiddleware]
    paths = [route.path for route in routes if isinstance(route, Route)]
    assert len(paths) == len(routes)
    assert paths[-1] == "/health", "custom routes come last"
    assert any(path.startswith("/.well-known/oauth-protected-resource") for path in paths[:-1])


def test_server_wiring_with_a_verifier_and_no_required_scopes_requires_none() -> None:
    auth = AuthSettings(
        issuer_url=AnyHttpUrl("https://auth.example"),
        resource_server_url=None,
    )
    server = MCPServer("guarded", token_verifier=_Tokens(), auth=auth)
    sse, post, routes, middleware = _sdk.server_wiring(server, _sse_endpoint, _post_endpoint)
    assert isinstance(sse, RequireAuthMiddleware)
    assert isinstance(post, RequireAuthMiddleware)
    assert sse.required_scopes == []
    assert sse.resource_metadata_url is None
    assert routes == [], "no resource server url: no protected resource metadata"
    classes: list[object] = [entry.cls for entry in middleware]
    assert classes == [AuthenticationMiddleware, AuthContextMiddleware]


# -- the installed major, and what it spells its own way ----------------------------------------


def test_the_major_is_the_installed_sdks() -> None:
    from importlib.metadata import version

    assert version("mcp") == _sdk.VERSION
    assert int(version("mcp").split(".")[0]) == _sdk.MAJOR


def test_a_message_goes_onto_the_sdks_stream_and_comes_off_it_the_same() -> None:
    request = types.JSONRPCRequest(jsonrpc="2.0", id=7, method="ping")
    item = session_message(request)
    assert isinstance(item, SessionMessage)
    assert _sdk.message_of(item) == request
    if _sdk.MAJOR < 2:  # 1.x's streams carry the root model, as its own transports send
        assert isinstance(item.message, types.JSONRPCMessage)


@pytest.mark.anyio
async def test_the_sender_context_is_what_the_sdks_streams_carry() -> None:
    send, receive = _sdk.create_context_streams[int](1)
    async with send, receive:
        await send.send(1)
        assert await receive.receive() == 1
        context = _sdk.sender_context(receive)
    if _sdk.MAJOR >= 2:
        assert context is not None
    else:
        assert context is None


def test_an_sdk_server_is_not_taken_for_a_fastmcp_one() -> None:
    server = MCPServer("plain")
    assert not is_fastmcp(server)
    assert not is_fastmcp(lowlevel_of(server))
    assert _sdk.app_state(server, "sse", "/sse") == {}
    assert _sdk.lowlevel_server(server) is lowlevel_of(server)


def test_a_store_per_session_needs_a_manager_that_admits_sessions() -> None:
    """mcp 1.28 and 2.x admit each session through ``_admit_session``, which the per-session
    store hooks; before 1.28 there is nothing to hook, and the manager says so."""

    async def release(store: Any) -> None:
        return None

    server = lowlevel_of(MCPServer("stores"))
    if hasattr(_sdk.StockSessionManager, "_admit_session"):
        manager = _sdk.PerSessionStoreManager(server, lambda session_id: None, release)  # type: ignore[arg-type,return-value]
        assert manager.event_store is None
    else:
        with pytest.raises(RuntimeError, match=r"needs mcp>=1\.28"):
            _sdk.PerSessionStoreManager(server, lambda session_id: None, release)  # type: ignore[arg-type,return-value]
