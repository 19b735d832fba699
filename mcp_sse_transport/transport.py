"""The drop-in for ``mcp.server.sse.SseServerTransport``, with a flow-controlled session handler."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from uuid import UUID, uuid4

import anyio
import anyio.abc
import mcp_types as types
from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.auth.provider import AccessToken
from mcp.server.lowlevel.server import Server
from mcp.server.transport_security import (
    DEFAULT_MAX_REQUEST_BODY_SIZE,
    RequestBodyLimitMiddleware,
    TransportSecurityMiddleware,
    TransportSecuritySettings,
)
from mcp.shared._context_streams import ContextSendStream, create_context_streams
from mcp.shared._stream_protocols import ReadStream, WriteStream
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.authentication import BaseUser
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ._asgi import REFUSED, SSE_HEADERS, disconnected, end_stream, open_stream, stream_session, write_within
from .claims import ClaimSequence, LocalClaimSequence, RedisClaimSequence
from .config import SseConfig
from .errors import ErrorCode, EventTooLargeError, StoreError
from .events import encode_error, encode_event, error_body
from .handler import SessionHandler, Sink, replay_chunks, session_tag
from .ids import SEEN_REQUEST_IDS, EventId, event_id_prefix, format_event_id, parse_event_id, secret_matches
from .registry import RegistryStatistics, SessionRegistry
from .store import BEFORE_FIRST, EventStore, InMemoryEventStore

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from .cluster import Cluster, DirectoryEntry, Relay
    from .fencing import Lease

__all__ = ["RequestRejected", "SseServerTransport"]

logger = logging.getLogger("mcp_sse_transport")

_Inbound = ContextSendStream[SessionMessage | Exception]
_CLOSED = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)


class RequestRejected(ValueError):
    """``connect_sse`` refused the request and already answered it (a ValueError, as in stock)."""


@dataclass(slots=True)
class _Session:
    handler: SessionHandler
    inbound: _Inbound
    owner: str
    """The fingerprint of the credential that opened the session."""
    swallow: types.RequestId | None = None
    """Taken over: the id of the replayed ``initialize``, whose response the client already has."""
    handed_off: bool = False
    """Another worker carries the session on: its Redis state outlives this process's copy."""
    seen: _SeenIds | None = None
    """Request ids already accepted, from the first request on (without Redis: Redis keeps them
    across workers)."""
    exchanged: bool = False
    """A message went either way: a POST reached the session, or its server sent one. Until then
    the session is a probe, with nothing to resume: it ends with its connection instead of
    waiting ``session_grace``."""
    restore: _Restore | None = None
    """A handshake to replay before the first message, unless that message is ``initialize``."""
    lease: Lease | None = None
    """With Redis: this worker's lease of the session, which fences what it writes for it."""
    attempts: _Attempts = field(default_factory=lambda: _Attempts())
    """With Redis: the POSTs of a request id being delivered, and those that recorded it in
    Redis without delivering it."""


class _Attempts:
    """One session's delivery attempts of requests, on the worker serving it (the only one that
    delivers them): one attempt per request id at a time, each stamped in Redis with a nonce of
    its own. An attempt that may have recorded its id (the reply was lost, say) and did not
    deliver the request leaves its nonce here: the next attempt of that id takes the record
    over, instead of taking the id for one already delivered."""

    __slots__ = ("in_flight", "undelivered")

    def __init__(self) -> None:
        self.in_flight: dict[str, anyio.Event] = {}
        self.undelivered: dict[str, set[str]] = {}
        """Request id (as JSON) -> nonces of attempts that may have recorded it, undelivered."""


@dataclass(slots=True)
class _Attempt:
    """One POST's attempt to deliver a request (with Redis)."""

    key: str
    """The request id, as JSON."""
    nonce: str = field(default_factory=lambda: uuid4().hex[:16])
    reclaim: tuple[str, ...] = ()
    recorded: bool | None = False
    """Whether this attempt's record is in Redis; ``None``: unknown (its command failed)."""
    delivered: bool = False


class _Restore:
    """The handshake of a client that reconnected initialized (it sent ``MCP-Protocol-Version``)
    but could not resume: replayed to the new session's server before the client's first message,
    so its calls work without an ``initialize`` of its own."""

    __slots__ = ("lock", "version")

    def __init__(self, version: str) -> None:
        self.version = version
        self.lock = anyio.Lock()
        """Held while the handshake is replayed: concurrent first POSTs queue behind it."""


_RESTORED_REQUEST_ID = "mcp-sse-transport/restore"
"""The id of a restored session's synthetic ``initialize``, whose response is swallowed."""


def _restoration(scope: Scope) -> _Restore | None:
    """What a new session replays for this GET: a handshake at the protocol version of its
    ``MCP-Protocol-Version`` header (only an initialized client sends one), if the SDK speaks it
    through ``initialize``; else nothing, and the session starts as any other."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"mcp-protocol-version":
            version = value.decode("latin-1").strip()
            return _Restore(version) if version in HANDSHAKE_PROTOCOL_VERSIONS else None
    return None


def _restored_handshake(version: str) -> tuple[types.JSONRPCRequest, types.JSONRPCNotification]:
    """The ``initialize`` and ``notifications/initialized`` of a restored session: the client's
    protocol version; no capabilities (the server must not ask it for roots, sampling or
    elicitation it may not have); a client info that says the session was restored."""
    client_info = {"name": "mcp-sse-transport-restored-session", "version": "0"}
    params = {"protocolVersion": version, "capabilities": {}, "clientInfo": client_info}
    initialize = types.JSONRPCRequest(jsonrpc="2.0", id=_RESTORED_REQUEST_ID, method="initialize", params=params)
    return initialize, types.JSONRPCNotification(jsonrpc="2.0", method="notifications/initialized")


class _SeenIds:
    """The last :data:`SEEN_REQUEST_IDS` request ids of a session, to recognise a POST sent again."""

    __slots__ = ("_ids", "_order")

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def add(self, request_id: types.RequestId) -> bool:
        """False if the id was seen before."""
        key = json.dumps(request_id)
        if key in self._ids:
            return False
        self._ids.add(key)
        self._order.append(key)
        if len(self._order) > SEEN_REQUEST_IDS:
            self._ids.discard(self._order.popleft())
        return True


def _ended_streams() -> tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]:
    """Streams for a ``Server.run`` that has nothing to serve: reads end, writes are refused."""
    inbound, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, outbound = create_context_streams[SessionMessage](0)
    inbound.close()
    outbound.close()
    return read_stream, write_stream


def _owner(scope: Scope) -> str:
    """A fingerprint of the request's credential ("" when anonymous): a session answers only the
    principal that opened it, on any worker. The SDK's bearer auth fingerprints its token's
    client, scopes and claims; any other Starlette authentication, its user's class and identity."""
    user = scope.get("user")
    if isinstance(user, AuthenticatedUser):
        principal: Any = authorization_context(user)
    elif isinstance(user, BaseUser) and user.is_authenticated:
        try:
            identity = user.identity
        except NotImplementedError:  # BaseUser's default: the display name is what it has
            identity = user.display_name
        principal = {"user": f"{type(user).__module__}.{type(user).__qualname__}", "identity": identity}
    else:
        return ""
    return hashlib.sha256(json.dumps(principal, sort_keys=True).encode()).hexdigest()


class _ServerWriteStream:
    """The write stream the SDK server writes to: each message becomes one granted event."""

    __slots__ = ("_cluster", "_session", "_task_group")

    def __init__(self, session: _Session, task_group: anyio.abc.TaskGroup, cluster: Cluster | None) -> None:
        self._session = session
        self._task_group = task_group
        self._cluster = cluster

    async def send(self, item: SessionMessage, /) -> None:
        message = item.message
        self._session.exchanged = True
        answered = message.id if isinstance(message, types.JSONRPCResponse | types.JSONRPCError) else None
        if answered is not None and answered == self._session.swallow:
            self._session.swallow = None  # the replayed initialize's: the client has it already
            return
        try:
            # Bytes straight from pydantic-core: what model_dump_json does, without the str round trip.
            data = message.__pydantic_serializer__.to_json(message, by_alias=True, exclude_unset=True)
        except (ValueError, TypeError) as exc:  # PydanticSerializationError is a ValueError
            await _report_unsendable(self._session, self._task_group, message, _Unsendable.unserializable(exc))
        else:
            try:
                await self._session.handler.send(data)
            except EventTooLargeError as exc:
                await _report_unsendable(self._session, self._task_group, message, _Unsendable.too_large(exc))
        if answered is not None and self._cluster is not None:
            await self._session.handler.flush()  # stored before it is struck off: this worker may die
            try:
                await self._cluster.remove_pending(self._session.handler.session_id, answered)
            except StoreError as exc:  # the next event's append reports the store's failure
                logger.warning("session %s: %s", self._session.handler.tag, exc)

    async def aclose(self) -> None:
        await self._session.handler.close()

    async def __aenter__(self) -> _ServerWriteStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _jsonrpc_error(
    request_id: types.RequestId, message: str, code: int = ErrorCode.INTERNAL_ERROR
) -> types.JSONRPCError:
    return types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))


def _dump(message: types.JSONRPCMessage) -> str:
    return message.model_dump_json(by_alias=True, exclude_unset=True)


async def _answer_locally(session: _Session, answer: types.JSONRPCError) -> None:
    """Hand the server an answer to its own request, from a task of its own: the server may be
    reading in the very task that wrote the request. Dropped if it stops reading."""
    with anyio.move_on_after(session.handler.config.grant_timeout), suppress(*_CLOSED):
        await session.inbound.send(SessionMessage(answer))


@dataclass(frozen=True, slots=True)
class _Unsendable:
    """Why an outbound message could not be sent, as its error event and answers say it."""

    code: ErrorCode
    problem: str
    """Completes "Outbound message …", "Response …", "Request …"."""
    cause: Exception
    data: dict[str, Any]

    @classmethod
    def unserializable(cls, exc: Exception) -> _Unsendable:
        return cls(ErrorCode.INTERNAL_ERROR, "could not be serialized", exc, {})

    @classmethod
    def too_large(cls, exc: EventTooLargeError) -> _Unsendable:
        return cls(ErrorCode.MESSAGE_TOO_LARGE, "is too large", exc, {"size": exc.size, "max_event_bytes": exc.limit})


async def _report_unsendable(
    session: _Session, task_group: anyio.abc.TaskGroup, message: types.JSONRPCMessage, why: _Unsendable
) -> None:
    """Tell the client which message was lost, and answer whoever waits for it, on either side."""
    handler = session.handler
    request_id = getattr(message, "id", None)
    method = getattr(message, "method", None)
    logger.error(
        "session %s: outbound %s %s (%s); the session goes on",
        handler.tag,
        type(message).__name__,
        why.problem,
        why.cause,
        exc_info=why.cause if why.code is ErrorCode.INTERNAL_ERROR else None,
    )
    details = {key: value for key, value in (("id", request_id), ("method", method)) if value is not None}
    try:
        await handler.send(
            error_body(why.code, f"Outbound message {why.problem}", {**details, **why.data} or None), event="error"
        )
        if isinstance(message, types.JSONRPCResponse):
            await handler.send(_dump(_jsonrpc_error(message.id, f"Response {why.problem}", why.code)))
        elif isinstance(message, types.JSONRPCError):
            replacement = types.ErrorData(code=message.error.code, message=message.error.message)
            await handler.send(_dump(types.JSONRPCError(jsonrpc="2.0", id=message.id, error=replacement)))
        elif isinstance(message, types.JSONRPCRequest):
            # The server awaits the client's answer to a request the client never got: answer it.
            task_group.start_soon(
                _answer_locally, session, _jsonrpc_error(message.id, f"Request {why.problem}", why.code)
            )
    except _CLOSED:
        logger.debug("session %s: ended before the failed send could be reported", handler.tag)


def _id_of(body: bytes) -> types.RequestId | None:
    """The JSON-RPC id of a POSTed body that is JSON but not a valid message, if it names one."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or "method" not in parsed:
        return None
    request_id = parsed.get("id")
    return request_id if isinstance(request_id, str | int) and not isinstance(request_id, bool) else None


class SseServerTransport:
    """SSE server transport for MCP, a drop-in for ``mcp.server.sse.SseServerTransport``.

    ``connect_sse`` serves the GET stream and yields the SDK server's streams;
    ``handle_post_message`` is the ASGI app for the POST endpoint. Same constructor, statuses,
    texts and wire format as the stock class; underneath, each session's events go through a
    :class:`~mcp_sse_transport.handler.SessionHandler` configured by ``config``.

    With ``config.redis_url`` set, sessions live in Redis: any worker sharing it serves any
    request, and a dead worker's sessions are taken over. That needs ``server`` (a worker runs it
    for the sessions it takes over) and the transport entered (``async with transport:``) for
    as long as it serves; :func:`~mcp_sse_transport.sse_app` does both.
    """

    def __init__(
        self,
        endpoint: str,
        security_settings: TransportSecuritySettings | None = None,
        max_request_body_size: int = DEFAULT_MAX_REQUEST_BODY_SIZE,
        *,
        config: SseConfig | None = None,
        event_store: EventStore | None = None,
        server: Server[Any] | None = None,
    ) -> None:
        """``endpoint`` is the relative path clients POST to, e.g. ``"/messages/"``.

        Raises ValueError for a full URL (``://``, a leading ``//``, ``?`` or ``#``) and for a
        non-positive ``max_request_body_size``, as the stock class does; with ``redis_url``, for
        a missing ``server`` or an ``event_store`` that is not a ``RedisEventStore``.
        """
        if max_request_body_size <= 0:
            raise ValueError("max_request_body_size must be a positive number of bytes")
        if "://" in endpoint or endpoint.startswith("//") or "?" in endpoint or "#" in endpoint:
            raise ValueError(
                f"Given endpoint: {endpoint} is not a relative path (e.g., '/messages/'), "
                "expecting a relative path (e.g., '/messages/')."
            )
        if not endpoint.startswith("/"):
            endpoint = "/" + endpoint
        self._endpoint = endpoint
        self._config = config or SseConfig()
        self._security = TransportSecurityMiddleware(security_settings)
        self._post_message_app = RequestBodyLimitMiddleware(self._handle_post_message, max_request_body_size)
        self._registry: SessionRegistry[_Session] = SessionRegistry()
        self._server = server
        self._cluster: Cluster | None = None
        self._adopting: dict[str, anyio.Event] = {}
        self._reserved = 0
        """Sessions being opened or taken over, not yet in the registry: ``max_sessions`` counts them."""
        self._store: EventStore
        self._store_client: Redis | None = None
        self._claim_numbers: ClaimSequence = LocalClaimSequence()
        if self._config.redis_url is not None:
            if server is None:
                raise ValueError("redis_url needs server=...: a worker that takes a session over runs it")
            self._cluster = _cluster(self._config, event_store)
            if event_store is None:  # the store's client is ours: closed on leaving
                self._store_client = self._cluster.store.redis
            self._store = self._cluster.store
            self._claim_numbers = RedisClaimSequence(
                self._cluster.redis, self._config.redis_prefix, self._config.replay_max_age
            )
        else:
            self._store = (
                event_store
                if event_store is not None
                else InMemoryEventStore(
                    max_events=self._config.replay_max_events,
                    max_bytes=self._config.replay_max_bytes,
                    max_age=self._config.replay_max_age,
                )
            )

    @property
    def config(self) -> SseConfig:
        return self._config

    @property
    def _read_stream_writers(self) -> dict[UUID, _Inbound]:
        """The stock class's session map, for code that inspects it: open sessions by UUID."""
        return {UUID(hex=session_id): session.inbound for session_id, session in self._registry.items()}

    def statistics(self) -> RegistryStatistics:
        """A snapshot of every open session's stream."""
        return self._registry.statistics()

    async def __aenter__(self) -> SseServerTransport:
        """Join the Redis cluster (with ``redis_url``; nothing to do without). Raises StoreError
        when Redis cannot be reached."""
        if self._cluster is not None:
            self._cluster.on_post = self._on_post
            self._cluster.on_claim = self._on_claim
            self._cluster.on_attach = self._on_attach
            self._cluster.on_lost = self._on_lost
            await self._cluster.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc_val: BaseException | None, exc_tb: TracebackType | None
    ) -> None:
        """:meth:`shutdown`, then leave the cluster."""
        try:
            await self.shutdown()
        finally:
            if self._cluster is not None:
                await self._cluster.__aexit__(exc_type, exc_val, exc_tb)
                await self._cluster.redis.aclose()
                if self._store_client is not None:
                    await self._store_client.aclose()

    async def shutdown(self) -> None:
        """Refuse new sessions, then drain every open stream within ``drain_timeout`` and end it
        with an ``event: error`` (code ``SERVER_SHUTDOWN``) carrying a ``retry:`` hint.

        With ``redis_url``, sessions are handed off rather than ended: their leases are given up,
        so the client's resume, on another worker, takes each one over at once."""
        logger.info("shutting down %d SSE session(s)", len(self._registry))
        if self._cluster is not None:
            for _, session in self._registry.items():
                session.handed_off = True
        await self._registry.shutdown()
        if self._cluster is not None:
            for session_id, _ in list(self._registry.items()):
                with suppress(StoreError):
                    await self._cluster.release(session_id)

    @asynccontextmanager
    async def connect_sse(
        self, scope: Scope, receive: Receive, send: Send
    ) -> AsyncIterator[tuple[ReadStream[SessionMessage | Exception], WriteStream[SessionMessage]]]:
        """Serve this GET's event stream and yield ``(read_stream, write_stream)`` for ``Server.run``.

        A GET with ``Last-Event-ID`` (header, or the ``last_event_id`` query parameter) resumes
        that session: the session's server is already running, so the yielded streams are at end
        of stream and ``Server.run`` returns at once, while the stream is served until it ends.
        Raises ValueError (:class:`RequestRejected`), after answering the request itself, when it
        fails the Host/Origin checks (421/403), arrives during shutdown (503), would open a
        session past ``max_sessions`` (503), or Redis cannot be reached (503).
        """
        if scope["type"] != "http":
            raise ValueError("connect_sse can only handle HTTP requests")
        if self._cluster is not None:
            self._cluster.check_running()
        request = Request(scope, receive)
        error_response = await self._security.validate_request(request, is_post=False)
        if error_response is None and self._registry.shutting_down:
            error_response = self._unavailable("Server shutting down")
        if error_response is not None:
            await error_response(scope, receive, send)
            raise RequestRejected("Request validation failed")
        last_event_id = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        del request  # held for the session's whole life otherwise

        if scope["method"] == "HEAD":
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            yield _ended_streams()
            return

        preface = b""
        if last_event_id:
            resume = await self._find_resumable(last_event_id, scope, receive, send)
            if resume is not None:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(resume)
                    yield _ended_streams()
                return
            logger.info("resume refused: Last-Event-ID names no resumable session")
            preface = encode_error(ErrorCode.RESUME_UNKNOWN, "Unknown or expired Last-Event-ID; a new session starts")

        if not self._reserve_slot():  # before any await: concurrent GETs cannot overshoot the cap
            await self._unavailable("Too many open sessions")(scope, receive, send)
            raise RequestRejected("Too many open sessions")

        session_id = uuid4().hex
        inbound, read_stream = create_context_streams[SessionMessage | Exception](0)
        session = _Session(SessionHandler(session_id, self._config, self._store), inbound, _owner(scope))
        session.restore = _restoration(scope)
        try:
            if self._cluster is not None:
                try:
                    await self._cluster.register(session_id, session.owner, session.handler.secret)
                except StoreError as exc:
                    logger.error("refused a session: %s", exc)
                    await self._unavailable("Session store unavailable")(scope, receive, send)
                    raise RequestRejected("Session store unavailable") from exc
                self._fence(session, self._cluster)
            self._registry.add(session_id, session)
        finally:
            self._reserved -= 1
        logger.debug("session %s opened", session.handler.tag)
        # Attached before the server can write, so nothing it writes is taken for a detached session.
        attachment = session.handler.attach()
        preface += self._endpoint_event(scope, session_id, session.handler.secret)

        async def serve_stream() -> None:
            try:
                await stream_session(session.handler, scope, receive, send, preface, attachment=attachment)
                await self._linger(session)
            finally:
                self._registry.discard(session_id, session)
                inbound.close()
            # Ended for good: nobody can ever read what its server still does. Cancel the server's
            # run (the caller's ``async with`` body), which cancels every request in flight.
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_stream)
                try:
                    yield read_stream, _ServerWriteStream(session, tg, self._cluster)
                except anyio.get_cancelled_exc_class():
                    if not session.handler.ended:
                        # The worker is going away (a forced shutdown), not the session: end it
                        # here at once, and with Redis another worker takes it over.
                        session.handed_off = True
                        session.handler.abort("this worker stopped serving it")
                    raise
                finally:
                    await session.handler.close()
        finally:
            self._registry.discard(session_id, session)
            inbound.close()
            read_stream.close()
            with anyio.CancelScope(shield=True):
                await self._forget(session)

    def _reserve_slot(self) -> bool:
        """Count a session about to be opened or taken over against ``max_sessions``, with no
        await between the check and the count; False (logged) when the worker is full. The
        caller gives the slot back (``self._reserved -= 1``) once the session is in the
        registry, or failed to get there."""
        limit = self._config.max_sessions
        if limit is not None and len(self._registry) + self._reserved >= limit:
            logger.warning("refused a session: %d open, the limit", limit)
            return False
        self._reserved += 1
        return True

    def _unavailable(self, reason: str) -> Response:
        return Response(reason, status_code=503, headers=self._retry_after())

    def _retry_after(self) -> dict[str, str]:
        """``Retry-After``: ``retry_interval`` in whole seconds, at least one."""
        return {"Retry-After": str(max(1, round(self._config.retry_interval)))}

    async def _forget(self, session: _Session) -> None:
        """The session ended here: drop its events and its directory entry, unless another
        worker carries it on."""
        session_id = session.handler.session_id
        try:
            if self._cluster is None:
                await self._store.drop(session_id)
            elif session.handed_off:
                await self._cluster.release(session_id, session.lease)
            else:
                await self._cluster.forget(session_id, session.lease)
        except StoreError as exc:
            logger.warning("session %s: %s", session.handler.tag, exc)

    async def _find_resumable(
        self, last_event_id: str, scope: Scope, receive: Receive, send: Send
    ) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """What serves the resume a Last-Event-ID asks for, if this credential may resume it.
        Answers 503 itself if the store cannot be reached."""
        parsed = parse_event_id(last_event_id)
        if parsed is None:
            return None
        session_id, token, secret = parsed
        try:
            # Its place in line, drawn first, as it arrives: from Redis with a cluster (0: Redis
            # does not know the session), so every worker shares one order, never a clock.
            arrived = await self._claim_numbers.next(session_id)
            if not arrived:
                return None
            session = self._serving(session_id)
            if session is None and self._cluster is not None:
                return await self._find_in_cluster(parsed, arrived, scope, receive, send)
            if (
                session is None
                or session.handler.ended
                or not secret_matches(secret, session.handler.secret)
                or _owner(scope) != session.owner
            ):
                return None
            if await self._store.replay(session_id, token, until=token) is None:  # valid, without the events
                return None
        except StoreError as exc:
            logger.warning("resume refused: %s", exc)
            await self._unavailable("Session store unavailable")(scope, receive, send)
            raise RequestRejected("Session store unavailable") from exc
        logger.info("session %s: resuming", session.handler.tag)
        preface = self._endpoint_event(scope, session_id)
        return partial(stream_session, session.handler, scope, receive, send, preface, after=token, arrived=arrived)

    def _endpoint_event(self, scope: Scope, session_id: str, secret: str | None = None) -> bytes:
        """The ``endpoint`` event. A new session's (given its ``secret``) carries the id
        ``<session>.<secret>:0``, "before the first event", so a client that drops before any
        message can still resume; a resume's carries none, so the client keeps the id it resumed
        from."""
        path = quote(scope.get("root_path", "").rstrip("/") + self._endpoint)
        return encode_event(
            f"{path}?session_id={session_id}",
            event="endpoint",
            id=None if secret is None else format_event_id(session_id, BEFORE_FIRST, secret),
            retry=self._config.retry_ms,
        )

    async def handle_post_message(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI app for the message endpoint: 405 to anything but POST, 413 over the body limit."""
        if scope["method"] != "POST":
            return await Response(status_code=405, headers={"Allow": "POST"})(scope, receive, send)
        if self._cluster is not None:
            self._cluster.check_running()
        await self._post_message_app(scope, receive, send)

    async def _handle_post_message(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        error_response = await self._security.validate_request(request, is_post=True)
        if error_response is not None:
            return await error_response(scope, receive, send)

        session_param = request.query_params.get("session_id")
        if session_param is None:
            return await Response("session_id is required", status_code=400)(scope, receive, send)
        try:
            session_id = UUID(hex=session_param).hex
        except ValueError:
            return await Response("Invalid session ID", status_code=400)(scope, receive, send)

        session = self._serving(session_id)
        if session is None and self._cluster is not None:
            return await self._post_in_cluster(session_id, request, scope, receive, send)
        if session is None or _owner(scope) != session.owner:
            # Another credential's session looks exactly like no session at all.
            logger.info("POST for unknown session %s", session_tag(session_id))
            return await _not_found()(scope, receive, send)

        response, report = await self._deliver(session, await request.body(), request)
        if response.status_code == _NOT_HERE:
            if self._cluster is not None:  # where it lives now, if anywhere
                return await self._post_in_cluster(session_id, request, scope, receive, send)
            response = _not_found()
        await response(scope, receive, send)
        if report is not None:
            await report()

    async def _deliver(
        self, session: _Session, body: bytes, request: Request
    ) -> tuple[Response, Callable[[], Coroutine[Any, Any, None]] | None]:
        """Hand a POSTed body to the session's server; the response, and what to do once it was
        sent (report a parse error on the stream too)."""
        session.exchanged = True  # no probe: a dropped connection now waits for a resume
        try:
            message = types.jsonrpc_message_adapter.validate_json(body, by_name=False)
        except ValidationError as err:
            logger.warning("session %s: could not parse a POSTed message", session.handler.tag)
            return Response("Could not parse message", status_code=400), partial(
                self._report_parse_error, session, body, err
            )
        if (
            isinstance(message, types.JSONRPCRequest)
            and len(json.dumps(message.id)) > self._config.max_request_id_bytes
        ):
            logger.warning("session %s: refused a request whose id is too long", session.handler.tag)
            return self._id_too_long(), partial(self._report_id_too_long, session)
        attempt = await self._begin_attempt(session, message)
        try:
            try:
                first_time = await self._record(session, message, body, attempt)
            except StoreError as exc:  # not delivered; its record, if any, is undone or taken over
                logger.warning("session %s: %s", session.handler.tag, exc)
                return self._unavailable("Session store unavailable"), None
            if first_time is None:
                logger.warning("session %s: refused a request: too many unanswered", session.handler.tag)
                return self._unavailable("Too many requests in flight"), None
            if not first_time:
                # MCP forbids reusing a request id in a session: this is a POST sent again by a
                # client that could not tell whether the first arrived. It did; the answer comes once.
                logger.info("session %s: a request was POSTed again; not delivered twice", session.handler.tag)
                return Response("Accepted", status_code=202), None
            try:
                await self._prepare(session, message)
                # Hand the message over before answering 202: an accepted message is never lost.
                # Shielded: a send cancelled once the server took the message cannot tell it did.
                delivery = SessionMessage(message, metadata=self._metadata(session, message, request))
                with anyio.CancelScope(shield=True):
                    await session.inbound.send(delivery)
            except _CLOSED:  # it ended here: for good, or (with Redis) it lives on elsewhere
                return Response("Could not find session", status_code=_NOT_HERE), None
            if attempt is not None:
                attempt.delivered = True
            await self._after_delivery(session, message)
        finally:
            if attempt is not None:
                self._end_attempt(session, attempt)
        return Response("Accepted", status_code=202), None

    async def _record(
        self, session: _Session, message: types.JSONRPCMessage, body: bytes, attempt: _Attempt | None = None
    ) -> bool | None:
        """Note a request's id, and keep in Redis what a worker taking the session over needs:
        the handshake, and which requests still wait for an answer. False for a request id the
        session has seen before; ``None`` (with Redis) when it has too many unanswered."""
        session_id, cluster = session.handler.session_id, self._cluster
        if isinstance(message, types.JSONRPCRequest):
            if cluster is None:
                if session.seen is None:
                    session.seen = _SeenIds()
                return session.seen.add(message.id)
            assert attempt is not None
            attempt.recorded = None  # until Redis answers
            outcome = await cluster.accept_request(session_id, message.id, attempt.nonce, attempt.reclaim)
            attempt.recorded = outcome == "new"
            if outcome != "new":
                return None if outcome == "full" else False
            if message.method == "initialize":
                await cluster.record_handshake(session_id, "init", body)
        elif (
            cluster is not None
            and isinstance(message, types.JSONRPCNotification)
            and message.method == "notifications/initialized"
        ):
            await cluster.record_handshake(session_id, "initialized", body)
        return True

    # -- exactly-once requests and bounded unanswered lists (with Redis) -------------------------

    async def _begin_attempt(self, session: _Session, message: types.JSONRPCMessage) -> _Attempt | None:
        """With Redis, a request's delivery attempt, once no other attempt of its id is under way
        here (a POST sent again while the first is still delivered waits for its outcome)."""
        if self._cluster is None or not isinstance(message, types.JSONRPCRequest):
            return None
        key = json.dumps(message.id)
        attempts = session.attempts
        while (earlier := attempts.in_flight.get(key)) is not None:
            await earlier.wait()
        attempts.in_flight[key] = anyio.Event()  # no await since the check: nobody else is
        return _Attempt(key, reclaim=tuple(attempts.undelivered.get(key, ())))

    def _end_attempt(self, session: _Session, attempt: _Attempt) -> None:
        """An attempt is over: one that may have recorded its id without delivering it leaves
        its nonce for the next attempt to take the record over, and has the record undone."""
        attempts = session.attempts
        if attempt.delivered:
            attempts.undelivered.pop(attempt.key, None)
        elif attempt.recorded is not False:
            attempts.undelivered.setdefault(attempt.key, set()).add(attempt.nonce)
            while len(attempts.undelivered) > SEEN_REQUEST_IDS:  # bounded as the ids seen are
                del attempts.undelivered[next(iter(attempts.undelivered))]
            assert self._cluster is not None
            with suppress(RuntimeError):  # the worker is leaving: the next attempt takes the record over
                self._cluster.spawn("undoing an undelivered request's record", self._undo_record, session, attempt)
        attempts.in_flight.pop(attempt.key).set()

    async def _undo_record(self, session: _Session, attempt: _Attempt) -> None:
        """Remove an undelivered attempt's record from Redis (best effort: while it stays, the
        next attempt takes it over), so a worker taking the session over neither takes the id
        for delivered nor answers it ``REQUEST_INTERRUPTED``."""
        assert self._cluster is not None
        request_id: types.RequestId = json.loads(attempt.key)
        try:
            with anyio.fail_after(self._config.forward_timeout):
                undone = await self._cluster.unaccept_request(session.handler.session_id, request_id, attempt.nonce)
        except (StoreError, TimeoutError) as exc:
            logger.info("session %s: an undelivered request stays recorded (%s)", session.handler.tag, exc)
            return
        nonces = session.attempts.undelivered.get(attempt.key)
        if undone and nonces is not None:
            nonces.discard(attempt.nonce)
            if not nonces:
                del session.attempts.undelivered[attempt.key]

    def _metadata(self, session: _Session, message: types.JSONRPCMessage, request: Request) -> ServerMessageMetadata:
        """A POSTed message's metadata; with Redis, a request's strikes it off the session's
        unanswered list if it settles without an answer (cancelled: mcp 2.x never answers it)."""
        metadata = ServerMessageMetadata(request_context=request)
        if self._cluster is not None and isinstance(message, types.JSONRPCRequest):
            metadata.on_request_unanswered = partial(self._strike_off, session, message.id)
        return metadata

    async def _after_delivery(self, session: _Session, message: types.JSONRPCMessage) -> None:
        """With Redis, a ``notifications/cancelled`` strikes its request off the unanswered list
        (before its POST is answered): the server will not answer it."""
        if (
            self._cluster is not None
            and isinstance(message, types.JSONRPCNotification)
            and message.method == "notifications/cancelled"
        ):
            request_id = (message.params or {}).get("requestId")
            if isinstance(request_id, str | int) and not isinstance(request_id, bool):
                await self._strike_off(session, request_id)

    async def _strike_off(self, session: _Session, request_id: types.RequestId) -> None:
        assert self._cluster is not None
        try:
            await self._cluster.remove_pending(session.handler.session_id, request_id)
        except StoreError as exc:  # it stays until the session ends (or is answered at a takeover)
            logger.warning("session %s: %s", session.handler.tag, exc)

    # -- probes and restored handshakes ----------------------------------------------------------

    async def _linger(self, session: _Session) -> None:
        """Return once a new session has ended. One with no message either way, and no resume
        claim, is a probe (mcp-remote opens streams it never reads): it ends as soon as its
        connection does, instead of holding its server and buffers for ``session_grace``. Any
        other session waits that long for a resume: a client that resumed before its first POST
        (while the server still held its connection, as after most network drops) wants it."""
        handler = session.handler
        await handler.detached()
        if not (session.exchanged or handler.claimed or handler.ended):
            handler.abort("its connection ended before any message arrived")
            return
        await handler.linger()

    async def _prepare(self, session: _Session, message: types.JSONRPCMessage) -> None:
        """Before a session's first message reaches its server: replay the handshake of a
        client that reconnected initialized but could not resume, unless the client opens with
        ``initialize`` itself (then the handshake is the client's own, exactly as sent).

        Concurrent first POSTs wait for the replay, so none reaches a server not yet
        initialized. Raises what ``inbound.send`` raises once the session ended."""
        restore = session.restore
        if restore is None:
            return
        async with restore.lock:
            if session.restore is None:  # another POST replayed it meanwhile
                return
            session.restore = None
            if isinstance(message, types.JSONRPCRequest) and message.method == "initialize":
                return
            initialize, initialized = _restored_handshake(restore.version)
            if self._cluster is not None:  # a worker taking the session over replays it too
                try:
                    session_id = session.handler.session_id
                    await self._cluster.record_handshake(session_id, "init", _dump(initialize).encode())
                    await self._cluster.record_handshake(session_id, "initialized", _dump(initialized).encode())
                except StoreError as exc:
                    logger.warning("session %s: the restored handshake was not stored (%s)", session.handler.tag, exc)
            logger.info(
                "session %s: a client that could not resume is back at protocol %s; its handshake is restored",
                session.handler.tag,
                restore.version,
            )
            session.swallow = initialize.id  # the client initialized long ago: it expects no answer
            try:
                await session.inbound.send(SessionMessage(initialize))
                await session.inbound.send(SessionMessage(initialized))
            except BaseException:
                session.restore = restore  # not replayed (the session ended, or this POST was cancelled)
                raise

    # -- scale-out: requests for sessions another worker owns, or owned --------------------------

    async def _post_in_cluster(
        self, session_id: str, request: Request, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """A POST for a session this worker does not hold: hand it to the owner, or take the
        session over if the owner is gone; 503 if neither happens within ``forward_timeout``
        (not delivered), 504 if the owner may have taken it but did not say so in time."""
        from .cluster import OwnerUnreachable

        cluster = self._cluster
        assert cluster is not None
        response: Response = self._unavailable("Session owner unreachable")
        report: Callable[[], Coroutine[Any, Any, None]] | None = None
        handed_over = False
        """A handover is under way: the owner may have the message, whatever happens now."""
        try:
            with anyio.move_on_after(self._config.forward_timeout):
                entry = await cluster.lookup(session_id)
                if entry is None or entry.fingerprint != _owner(scope):
                    logger.info("POST for unknown session %s", session_tag(session_id))
                    response = _not_found()
                    raise _Done
                body = await request.body()
                while True:
                    if entry.owner is not None and entry.owner != cluster.worker_id:
                        handed_over = True
                        try:
                            status = await cluster.forward(entry.owner, _forwarded(scope, session_id), body)
                        except OwnerUnreachable:  # nobody received it: not delivered
                            handed_over = False
                            await self._await_lease(session_id)
                        else:
                            handed_over = False
                            if status != _NOT_HERE:
                                response = self._status_response(status)
                                raise _Done
                            await self._await_lease(session_id)  # not delivered: it serves the session no more
                    session = await self._adopt(session_id)
                    if session is not None:
                        response, report = await self._deliver(session, body, request)
                        if response.status_code != _NOT_HERE:
                            raise _Done
                        response = self._unavailable("Session owner unreachable")  # unless a next turn finds it
                    if entry.owner == cluster.worker_id:  # so the next turn takes it, or waits
                        await self._clear_own_lease(session_id)
                    entry = await cluster.lookup(session_id)
                    if entry is None:
                        response = _not_found()
                        raise _Done
        except _Done:
            pass
        except _Full:
            response = self._unavailable("Too many open sessions")
        except TimeoutError:
            logger.warning("session %s: its owner did not take a POST in time", session_tag(session_id))
        except StoreError as exc:
            logger.warning("%s", exc)
            response = self._unavailable("Session store unavailable")
        if handed_over:
            response = self._outcome_unknown(session_id)
        await response(scope, receive, send)
        if report is not None:
            await report()

    def _outcome_unknown(self, session_id: str) -> Response:
        """504 for a POST handed to the owner that did not answer in time (or whose handover's
        reply from Redis was lost): it may have been delivered. Safe to send again: a request id
        is delivered once per session."""
        logger.warning("session %s: a POST handed to its owner has an unknown outcome", session_tag(session_id))
        return Response(
            "Outcome unknown: the session's owner may have taken the message",
            status_code=504,
            headers=self._retry_after(),
        )

    async def _clear_own_lease(self, session_id: str) -> None:
        """The directory names this worker as the owner of a session it does not serve: a lease
        left behind (its release failed, say). Give it up, so the session is taken over at once;
        if this worker still renews it (the session is ending here), wait the lease out rather
        than ask Redis again and again."""
        assert self._cluster is not None
        if self._cluster.renews(session_id):
            await self._await_lease(session_id)
        else:
            await self._cluster.drop_stale_lease(session_id)

    def _status_response(self, status: int) -> Response:
        if status == 503:
            return self._unavailable("Session store unavailable")
        text = {202: "Accepted", 400: "Could not parse message", 404: "Could not find session"}
        return Response(text.get(status, "Internal Server Error"), status_code=status)

    async def _await_lease(self, session_id: str) -> None:
        """Wait until the lease of an owner that nobody answers for runs out."""
        assert self._cluster is not None
        remaining = await self._cluster.lease_remaining(session_id)
        if remaining > 0:
            await anyio.sleep(remaining)  # a lease is a deadline: nothing to wait on but the clock

    async def _find_in_cluster(
        self, parsed: EventId, arrived: int, scope: Scope, receive: Receive, send: Send
    ) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """What serves the resume of a session this worker does not hold, if Redis knows it, the
        id carries its secret, and it belongs to this credential."""
        assert self._cluster is not None
        session_id, token, secret = parsed
        entry = await self._cluster.lookup(session_id)
        if entry is None or not secret_matches(secret, entry.secret) or entry.fingerprint != _owner(scope):
            return None
        if await self._store.replay(session_id, token, until=token) is None:
            return None
        logger.info("session %s: resuming another worker's session", session_tag(session_id))
        return partial(self._resume_in_cluster, session_id, token, entry, arrived, scope, receive, send)

    async def _resume_in_cluster(
        self,
        session_id: str,
        token: str,
        entry: DirectoryEntry,
        arrived: int,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Serve a resume here: replay from Redis, then relay the owner's live events; or, if the
        owner is gone, take the session over and serve it as this worker's own."""
        from .cluster import OwnerUnreachable

        cluster = self._cluster
        assert cluster is not None
        sink = await open_stream(send, scope, self._config.socket_send_buffer)
        preface = self._endpoint_event(scope, session_id)
        after: str | None = token
        session: _Session | None = None
        try:
            for _ in range(3):  # the owner may die, and another worker take over, meanwhile
                if entry.owner is not None and entry.owner != cluster.worker_id:
                    try:
                        async with cluster.relay(entry.owner, session_id, arrived) as relay:
                            if preface:
                                after = await self._replay_here(sink, session_id, entry.secret, token, preface)
                                preface = b""
                            if after is None:
                                break
                            await relay.attach(after)
                            graceful = await self._follow(relay, sink, receive, session_id)
                        return await end_stream(scope, send, graceful, self._config.write_timeout)
                    except OwnerUnreachable:
                        with anyio.fail_after(self._config.owner_lease + self._config.forward_timeout):
                            await self._await_lease(session_id)
                session = await self._adopt(session_id)
                if session is not None:
                    break
                if entry.owner == cluster.worker_id:
                    await self._clear_own_lease(session_id)
                next_entry = await cluster.lookup(session_id)
                if next_entry is None:
                    break
                entry = next_entry
        except (StoreError, TimeoutError) as exc:
            logger.warning("session %s: resume failed (%s)", session_tag(session_id), exc)
            session = None
        except _Full:  # the client reconnects after the retry hint, to this worker or another
            full = encode_error(ErrorCode.SERVER_SHUTDOWN, "Too many open sessions", retry=self._config.retry_ms)
            await write_within(sink, full, self._config.write_timeout)
            return await end_stream(scope, send, False, self._config.write_timeout)
        if session is None or after is None:
            return await end_stream(scope, send, False, self._config.write_timeout)
        await stream_session(session.handler, scope, receive, send, preface, after=after, sink=sink, arrived=arrived)

    async def _replay_here(self, sink: Sink, session_id: str, secret: str, token: str, preface: bytes) -> str | None:
        """Write ``preface`` and the stored events after ``token``; returns the last token
        written, or ``None`` if the connection failed."""
        if not await write_within(sink, preface, self._config.write_timeout):
            return None
        last = token
        async for chunk, _, through in replay_chunks(
            self._store, session_id, event_id_prefix(session_id, secret), token
        ):
            if not await write_within(sink, chunk, self._config.write_timeout):
                return None
            last = through
        return last

    async def _follow(self, relay: Relay, sink: Sink, receive: Receive, session_id: str) -> bool:
        """Write what the owner relays until it ends the stream (returns whether gracefully), the
        client goes, a write stalls, or the owner's lease passes to another worker."""
        cluster = self._cluster
        assert cluster is not None
        graceful = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                await disconnected(receive)()
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                while True:
                    with anyio.move_on_after(self._config.owner_lease) as idle:
                        header, body = await relay.messages.receive()
                    if idle.cancelled_caught:
                        entry = await cluster.lookup(session_id)
                        if entry is None or entry.owner != relay.owner:
                            break
                        continue
                    if header["t"] == "end":
                        graceful = bool(header["g"])
                        break
                    with anyio.fail_after(self._config.write_timeout):
                        await sink(body)
                    await cluster.ack(relay, header["s"])
            except Exception as exc:  # the client, Redis or the relay failed: the stream is over
                logger.info("session %s: relayed stream ended (%s)", session_tag(session_id), type(exc).__name__)
            tg.cancel_scope.cancel()
        if not graceful:
            await cluster.detach(relay)
        return graceful

    async def _adopt(self, session_id: str) -> _Session | None:
        """Take over a session whose owner's lease ran out: a fresh server, fed the stored
        handshake, and a ``REQUEST_INTERRUPTED`` error for every request the old owner never
        answered. ``None`` if another worker holds the lease. Raises :class:`_Full` when this
        worker has ``max_sessions`` open already: a takeover counts as much as a new session."""
        cluster, server = self._cluster, self._server
        assert cluster is not None and server is not None
        if (session := await self._local(session_id)) is not None and self._serving(session_id) is session:
            return session
        if not self._reserve_slot():  # no await since _local: the check and the count are one
            raise _Full
        done = self._adopting[session_id] = anyio.Event()  # no await since _local: nobody else is
        try:
            if not await cluster.acquire(session_id):
                return None
            # Shielded: a session half taken over would forget, on expiry, what Redis holds of it.
            with anyio.CancelScope(shield=True):
                try:
                    session = await self._take_over(session_id, cluster, server)
                except BaseException:
                    with suppress(StoreError):
                        await cluster.abandon(session_id)  # nothing written: as if never taken over
                    raise
            return session
        finally:
            self._reserved -= 1
            if self._adopting.get(session_id) is done:
                del self._adopting[session_id]
            done.set()

    async def _take_over(self, session_id: str, cluster: Cluster, server: Server[Any]) -> _Session | None:
        entry = await cluster.lookup(session_id)
        if entry is None:
            await cluster.release(session_id)
            return None
        unanswered = await self._interrupt_unanswered(session_id, cluster)
        last_token = await cluster.store.last_token(session_id)
        inbound, read_stream = create_context_streams[SessionMessage | Exception](0)
        handler = SessionHandler(session_id, self._config, self._store, last_token=last_token, secret=entry.secret)
        session = _Session(handler, inbound, entry.fingerprint)
        self._fence(session, cluster)
        logger.info("session %s: taken over from a worker that stopped", handler.tag)
        await cluster.task_group.start(self._run_adopted, session, read_stream, server)
        for raw in entry.handshake:
            message = types.jsonrpc_message_adapter.validate_json(raw, by_name=False)
            if isinstance(message, types.JSONRPCRequest):
                session.swallow = message.id
            await inbound.send(SessionMessage(message))
        if unanswered:  # stored before they are struck off: this worker may die too
            await cluster.remove_pending(session_id, *unanswered)
        self._registry.add(session_id, session)
        return session

    async def _interrupt_unanswered(self, session_id: str, cluster: Cluster) -> list[types.RequestId]:
        """Store a ``REQUEST_INTERRUPTED`` error for every request the old owner accepted and
        never answered, straight into the replay log, before the session's handler exists: no
        producer's grant, so no buffer bound, only the pending bound (``replay_max_events``);
        the client's resume replays them. Returns their ids, to strike off once stored."""
        unanswered = await cluster.pending(session_id)
        events = [
            (
                "message",  # as the handler stores a message
                _dump(
                    _jsonrpc_error(
                        request_id,
                        "The server handling this request stopped before answering it",
                        ErrorCode.REQUEST_INTERRUPTED,
                    )
                ).encode(),
            )
            for request_id in unanswered
        ]
        for start in range(0, len(events), 500):  # one round trip each, of a bounded size
            await cluster.store.append_many(session_id, events[start : start + 500])
        return unanswered

    async def _run_adopted(
        self,
        session: _Session,
        read_stream: ReadStream[SessionMessage | Exception],
        server: Server[Any],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """A taken-over session's life on this worker: its server, until the session ends."""
        handler = session.handler
        try:
            async with anyio.create_task_group() as tg:
                write_stream = _ServerWriteStream(session, tg, self._cluster)
                tg.start_soon(server.run, read_stream, write_stream, server.create_initialization_options())
                task_status.started()
                try:
                    await handler.linger()
                finally:
                    self._registry.discard(handler.session_id, session)
                    session.inbound.close()
                    await handler.close()
                tg.cancel_scope.cancel()  # ended for good: stop its server's requests in flight
        except Exception:
            logger.exception("session %s: the server of a session taken over failed", handler.tag)
        finally:
            await read_stream.aclose()
            with anyio.CancelScope(shield=True):
                await self._forget(session)

    @staticmethod
    def _fence(session: _Session, cluster: Cluster) -> None:
        """Bind the session to the lease this worker just took of it: its writes to clients wait
        while the lease is not surely valid, and stop once it is lost."""
        lease = session.lease = cluster.lease(session.handler.session_id)
        assert lease is not None
        session.handler.guard = partial(lease.hold, bounded=False)

    def _serving(self, session_id: str) -> _Session | None:
        """This worker's session, unless its lease was lost (its stream may still be ending here,
        but it lives on another worker now: requests for it go there, or take it over anew)."""
        session = self._registry.get(session_id)
        if session is not None and self._cluster is not None and not self._cluster.serves(session_id):
            return None
        return session

    async def _local(self, session_id: str) -> _Session | None:
        """This worker's session, once no takeover of it is in progress here (one that failed
        may be followed by another request's: wait for that one too)."""
        while (adopting := self._adopting.get(session_id)) is not None:
            await adopting.wait()
        return self._registry.get(session_id)

    async def _on_post(self, header: dict[str, Any], body: bytes) -> int:
        """A POST another worker handed over for a session of this worker's."""
        session = await self._local(header["sid"])
        if session is None:  # it moved on (taken over, or handed off) since the sender looked
            return _NOT_HERE
        request = _forwarded_request(header)
        user = request.scope.get("user")
        context = auth_context_var.set(user) if isinstance(user, AuthenticatedUser) else None
        try:
            response, report = await self._deliver(session, body, request)
        finally:
            if context is not None:
                auth_context_var.reset(context)
        if report is not None:
            assert self._cluster is not None
            self._cluster.spawn("reporting a parse error", report)
        return response.status_code

    def _on_claim(self, session_id: str, arrived: int) -> tuple[int, int] | None:
        """A resume of this worker's session arrived at another worker: its place in line."""
        session = self._registry.get(session_id)
        return session.handler.claim(arrived) if session is not None else None

    async def _on_attach(self, header: dict[str, Any]) -> None:
        """Another worker relays a resumed stream of this worker's session: serve it through Redis."""
        assert self._cluster is not None
        session = await self._local(header["sid"])
        graceful = False
        try:
            if session is None or session.handler.ended:
                return
            handler = session.handler
            async with self._cluster.link(header) as (sink, closed, claim):
                if claim is None:  # the session was being taken over here when the resume arrived
                    claim = handler.claim(header["at"])
                attachment = await handler.attach_latest(claim)
                if attachment is not None:
                    graceful = await handler.run(sink, after=header["a"], attachment=attachment, closed=closed)
                else:  # a later resume won: this one is told so, through the relay, then ends
                    graceful = await write_within(sink, REFUSED, self._config.write_timeout)
        finally:
            await self._cluster.end_link(header, graceful)

    def _on_lost(self, session_id: str, gone: bool) -> None:
        """This worker no longer holds the session: another worker took it over (end the stream
        here, so the client resumes where the session lives now), or Redis lost it (end it)."""
        session = self._registry.get(session_id)
        if session is None:
            return
        assert self._cluster is not None
        if gone:
            message = "Session state was lost from Redis; the session ends"
            end = session.handler.send_error
            self._cluster.spawn("ending a lost session", end, ErrorCode.STORE_UNAVAILABLE, message)
        else:
            # Ended at once, with no drain: whatever it still has was stored before the lease was
            # lost (the new owner replays it) or never will be. The client's resume finds it there.
            session.handed_off = True
            session.handler.abort("another worker serves the session now")

    def _id_too_long_error(self) -> str:
        """The error object for a request id over ``max_request_id_bytes``."""
        limit = self._config.max_request_id_bytes
        return error_body(ErrorCode.INVALID_REQUEST, "Request id too long", {"max_request_id_bytes": limit})

    def _id_too_long(self) -> Response:
        """400 with a JSON-RPC error: the id is not echoed (nor remembered), so ``id`` is null."""
        body = f'{{"jsonrpc":"2.0","id":null,"error":{self._id_too_long_error()}}}'
        return Response(body, status_code=400, media_type="application/json")

    async def _report_id_too_long(self, session: _Session) -> None:
        """The same error on the stream, for clients that drop a POST's answer."""
        with suppress(*_CLOSED):
            await session.handler.send(self._id_too_long_error(), event="error")

    async def _report_parse_error(self, session: _Session, body: bytes, err: ValidationError) -> None:
        """Put a parse failure on the stream as well as on the 400: stock clients drop a POST's
        status, and a caller whose request was malformed would otherwise wait forever."""
        request_id = _id_of(body)
        try:
            await session.inbound.send(err)  # as stock does; the server logs and drops it
            await session.handler.send(
                error_body(
                    ErrorCode.PARSE_ERROR,
                    "Could not parse message",
                    {"id": request_id} if request_id is not None else None,
                ),
                event="error",
            )
            if request_id is not None:
                await session.handler.send(
                    _dump(_jsonrpc_error(request_id, "Invalid request", ErrorCode.INVALID_REQUEST))
                )
        except _CLOSED:
            logger.debug("session %s: ended before the parse error could be reported", session.handler.tag)


_NOT_HERE = 421
"""What a worker answers a POST handed to it for a session it no longer serves (HTTP's
Misdirected Request): not delivered, so the sender looks for the session again."""


class _Done(Exception):
    """The response to a POST is decided."""


class _Full(Exception):
    """This worker has ``max_sessions`` open: it cannot take another session over."""


def _not_found() -> Response:
    return Response("Could not find session", status_code=404)


def _forwarded(scope: Scope, session_id: str) -> dict[str, Any]:
    """What the owner needs of a POST to rebuild its request: path, query, headers, user."""
    user = scope.get("user")
    return {
        "sid": session_id,
        "p": scope.get("path", ""),
        "q": scope.get("query_string", b"").decode("latin-1"),
        "h": [[name.decode("latin-1"), value.decode("latin-1")] for name, value in scope.get("headers", [])],
        "u": user.access_token.model_dump(mode="json") if isinstance(user, AuthenticatedUser) else None,
    }


def _forwarded_request(header: dict[str, Any]) -> Request:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": header["p"],
        "root_path": "",
        "query_string": header["q"].encode("latin-1"),
        "headers": [(name.encode("latin-1"), value.encode("latin-1")) for name, value in header["h"]],
    }
    if header["u"] is not None:
        scope["user"] = AuthenticatedUser(AccessToken.model_validate(header["u"]))
    return Request(scope)


def _cluster(config: SseConfig, event_store: EventStore | None) -> Cluster:
    """The Redis side of a transport with ``redis_url``: client, store, directory."""
    try:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff, NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError as exc:
        raise ImportError("redis_url needs the redis extra: pip install 'mcp-sse-transport[redis]'") from exc
    from .cluster import Cluster
    from .redis_store import RedisEventStore

    url = config.redis_url
    assert url is not None

    def client(retry: Retry) -> Redis:
        return Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=config.forward_timeout,
            retry=retry,
            health_check_interval=30,
        )

    # Tried once more after a dropped connection (a lost reply, say): only what may run twice
    # goes through it (reads, SET, SREM, PEXPIRE, scripts made idempotent). A timeout is not
    # tried again: every command keeps its deadline.
    redis = client(Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, supported_errors=(RedisConnectionError,)))
    if event_store is None:
        # Never tried again by the client: an append (XADD) or a PUBLISH sent twice would run twice.
        event_store = RedisEventStore(
            client(Retry(NoBackoff(), 0)),
            prefix=config.redis_prefix,
            max_events=config.replay_max_events,
            max_age=config.replay_max_age,
        )
    elif not isinstance(event_store, RedisEventStore):
        raise ValueError("with redis_url, event_store must be a RedisEventStore (or None)")
    return Cluster(redis, event_store, config)
