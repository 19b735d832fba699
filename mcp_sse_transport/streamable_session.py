"""One Streamable HTTP session on the session host: its server run, its POSTs' response streams,
its standalone GET stream, resumes by ``Last-Event-ID``, and its end (DELETE, idle, shutdown)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from functools import partial
from typing import Any, Final

import anyio
import anyio.abc
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ._asgi import end_stream, open_stream, stream_session, write_within
from ._sdk import (
    DEFAULT_NEGOTIATED_VERSION,
    MCP_PROTOCOL_VERSION_HEADER,
    MCP_SESSION_ID_HEADER,
    REQUEST_CANCELLED,
    ContextReceiveStream,
    Server,
    SessionMessage,
    dump,
    jsonrpc_error,
    primes_streams,
    serve_session,
    session_message,
    types,
)
from ._sdk import Message as JsonRpcMessage
from .errors import ErrorCode, StoreError
from .events import encode_error, encode_event
from .handler import SessionHandler
from .host import SessionHost
from .ids import event_id_prefix, format_event_id, parse_event_id, secret_matches
from .outbound import CLOSED, ServerWriteStream
from .replay import replay_chunks
from .request_streams import JsonReply, SessionStreams, TooManyStreams
from .session import ACCEPTED, NOT_HERE, REPEATED, Delivery, Outcome, Session
from .store import BEFORE_FIRST, EventStore
from .stream_state import FailureKind

__all__ = ["STREAM_HEADERS", "HostedSession", "Responder", "json_error"]

logger = logging.getLogger("mcp_sse_transport")

STREAM_HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]
"""An event stream's response head, as the SDK's Streamable HTTP transport sends it."""

_NOTIFICATION = Delivery(once=False)


def json_error(
    message: str,
    status: int,
    code: int = ErrorCode.INVALID_REQUEST,
    *,
    session: str | None = None,
    headers: dict[str, str] | None = None,
    retry: dict[str, str] | None = None,
) -> Response:
    """An HTTP error with a JSON-RPC error body (``id: null``), as the SDK answers them."""
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": int(code), "message": message}})
    all_headers = {**(headers or {}), **(retry or {})}
    if session is not None:
        all_headers[MCP_SESSION_ID_HEADER] = session
    return Response(body, status, headers=all_headers, media_type="application/json")


class Responder:
    """One request's ASGI triple, and the status it was answered with (``None``: not yet)."""

    __slots__ = ("_send", "receive", "scope", "status")

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self._send = send
        self.status: int | None = None

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)

    async def respond(self, response: Response) -> None:
        await response(self.scope, self.receive, self.send)


class HostedSession:
    """A Streamable HTTP session: an SDK server run, its streams, and the requests in flight
    that hold it open (none for ``idle_timeout``: it ends, as stock)."""

    def __init__(
        self,
        session: Session,
        host: SessionHost,
        store: EventStore,
        idle_timeout: float | None,
        json_response: bool,
        on_end: Callable[[HostedSession], None],
    ) -> None:
        self.session = session
        self._on_end = on_end
        self._host = host
        self._config = host.config
        self._store = store
        self._idle_timeout = idle_timeout
        self._json_response = json_response
        self._idle = anyio.CancelScope()
        self._in_flight = 0
        self._cancel: anyio.CancelScope | None = None
        self._ending: tuple[int, str, bool] = (ErrorCode.INTERNAL_ERROR, "Session terminated", False)
        """The error every waiting request gets at the end, and whether streams end as at shutdown."""
        self.streams = SessionStreams(session.handler, store, self._config, self._spawn_later)
        self._write_stream: ServerWriteStream | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._ended = anyio.Event()
        session.routing = self.streams

    @property
    def session_id(self) -> str:
        return self.session.session_id

    @property
    def tag(self) -> str:
        return self.session.handler.tag

    def headers(self) -> dict[str, str]:
        return {MCP_SESSION_ID_HEADER: self.session_id}

    def _spawn_later(self, task: Any) -> None:
        """Start ``task`` in the session's task group; once the session ended, its end does it."""
        if self._task_group is not None:
            self._task_group.start_soon(task)

    @asynccontextmanager
    async def busy(self) -> AsyncIterator[None]:
        """A request in flight (an open stream included): the idle countdown waits for the last."""
        self._in_flight += 1
        self._idle.deadline = math.inf
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle_timeout is not None:
                self._idle.deadline = anyio.current_time() + self._idle_timeout

    # -- the session's life ----------------------------------------------------------------------

    async def serve(
        self,
        server: Server[Any],
        read_stream: ContextReceiveStream[SessionMessage | Exception],
        lifespan_state: Any,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the session's server until the session ends, then answer whoever still waits."""
        session = self.session
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                self._cancel = tg.cancel_scope
                self._write_stream = self._host.write_stream(session, tg)
                task_status.started()
                with self._idle:
                    await serve_session(server, read_stream, self._write_stream, lifespan_state, session.session_id)
                if self._idle.cancelled_caught:
                    logger.info("session %s: idle for %g s; it ends", self.tag, self._idle_timeout)
                tg.cancel_scope.cancel()
        except Exception:
            logger.exception("session %s: its server failed", self.tag)
        finally:
            self._task_group = None
            self._on_end(self)  # from now on its id is not found
            try:
                with anyio.CancelScope(shield=True):
                    self._host.discard(session)
                    read_stream.close()
                    await self._end()
                    await self._host.forget(session)
                    await self.streams.drop_all()
            finally:
                self._ended.set()

    def terminate(self) -> None:
        """End the session now (DELETE): requests waiting get a JSON-RPC error, streams end."""
        self.streams.ending = True  # the reason, not the server's cancelled answers, reaches them
        self._host.discard(self.session)
        if self._cancel is not None:
            self._cancel.cancel()

    async def shut_down(self) -> None:
        """End the session for a server shutdown: every waiting request gets a JSON-RPC error,
        each stream's last event says when to come back. Returns once the session has ended."""
        self._ending = (ErrorCode.SERVER_SHUTDOWN, "Server shutting down", True)
        self.streams.shutting_down = True
        self.terminate()
        if self._cancel is not None:  # its server runs: wait for the end it is coming to
            await self._ended.wait()

    async def _end(self) -> None:
        """Answer every request still waiting, then end every stream still open (answered ones
        drain): with the shutdown event, at a shutdown."""
        code, message, shutdown = self._ending
        async with anyio.create_task_group() as tg:
            unanswered = self.streams.unanswered()
            for request_id, stream in unanswered:
                tg.start_soon(self._answer, request_id, stream, code, message, shutdown)
            waiting = {id(stream) for _, stream in unanswered}
            for live in self.streams.open_streams():
                if id(live) not in waiting:
                    tg.start_soon(live.shutdown if shutdown else live.close)

    async def _answer(
        self, request_id: types.RequestId, stream: SessionHandler | JsonReply, code: int, message: str, shutdown: bool
    ) -> None:
        data = dump(jsonrpc_error(request_id, message, code))
        if isinstance(stream, JsonReply):
            await stream.send(data)
            return
        stream.epilogue = None
        with suppress(*CLOSED), anyio.move_on_after(self._config.drain_timeout):
            await stream.send(data)
        await (stream.shutdown() if shutdown else stream.close())

    # -- POST --------------------------------------------------------------------------------------

    async def post(self, message: JsonRpcMessage, body: bytes, request: Request, responder: Responder) -> None:
        """Hand a POSTed message to the server: a request's answer is this POST's response (an
        event stream, or JSON), anything else gets 202 once the server has it."""
        if not isinstance(message, types.JSONRPCRequest):
            outcome = await self._host.deliver_message(self.session, message, body, request, _NOTIFICATION)
            return await responder.respond(self._refusal(outcome) or Response(None, 202, headers=self.headers()))
        if message.method == "initialize" and message.params:
            version = str(message.params.get("protocolVersion", DEFAULT_NEGOTIATED_VERSION))
        else:
            version = request.headers.get(MCP_PROTOCOL_VERSION_HEADER, DEFAULT_NEGOTIATED_VERSION)
        if self.streams.waiting(message.id):
            error = json_error("Request id already in use in this session", 409, session=self.session_id)
            return await responder.respond(error)
        if self._json_response:
            await self._post_json(message, body, request, responder)
        else:
            await self._post_stream(message, body, request, responder, version)

    async def _post_json(
        self, message: types.JSONRPCRequest, body: bytes, request: Request, responder: Responder
    ) -> None:
        reply = self.streams.open_json(message.id)
        delivery = Delivery(on_unanswered=partial(self._cancelled, message.id), can_send_request=False, once=False)
        outcome = await self._host.deliver_message(self.session, message, body, request, delivery)
        refusal = self._refusal(outcome)
        if refusal is not None:
            self.streams.withdraw(message.id, reply)
            return await responder.respond(refusal)
        await reply.ready.wait()  # the answer, or the session's end answering for it
        assert reply.body is not None
        await responder.respond(Response(reply.body, 200, headers=self.headers(), media_type="application/json"))

    async def _post_stream(
        self, message: types.JSONRPCRequest, body: bytes, request: Request, responder: Responder, version: str
    ) -> None:
        try:
            stream = self.streams.open(message.id)
        except TooManyStreams:
            logger.warning("session %s: refused a request: too many streams", self.tag)
            retry = self._config.retry_after
            error = json_error("Too many streams in this session", 503, session=self.session_id, retry=retry)
            return await responder.respond(error)
        attachment = stream.attach()  # before the server can write: nothing is taken for detached
        primed = primes_streams(version)
        preface = b""
        delivery = Delivery(on_unanswered=partial(self._cancelled, message.id), once=False)
        if primed:
            preface = self._priming(stream, BEFORE_FIRST)
            delivery = replace(delivery, close_stream=stream.release, close_standalone=self._release_standalone)
        headers = self._stream_headers()
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                partial(
                    stream_session,
                    stream,
                    responder.scope,
                    responder.receive,
                    responder.send,
                    preface,
                    attachment=attachment,
                    headers=headers,
                )
            )
            outcome = await self._host.deliver_message(self.session, message, body, request, delivery)
            if outcome is not ACCEPTED:  # not delivered: the stream carries the refusal as its answer
                text = "Request id already used in this session" if outcome is REPEATED else outcome.text
                with suppress(*CLOSED):
                    await stream.send(dump(jsonrpc_error(message.id, text, ErrorCode.INVALID_REQUEST)))
                self.streams.answered(message.id, stream)

    def _refusal(self, outcome: Outcome) -> Response | None:
        if outcome is ACCEPTED:
            return None
        if outcome is REPEATED:
            return Response(None, 202, headers=self.headers())
        if outcome is NOT_HERE:
            return json_error("Session not found", 404)
        retry = self._config.retry_after if outcome.retry else None
        return json_error(outcome.text, outcome.status, session=self.session_id, retry=retry)

    async def _cancelled(self, request_id: types.RequestId) -> None:
        """A request settled without an answer (cancelled): its stream ends with one, as stock's."""
        assert self._write_stream is not None
        error = jsonrpc_error(request_id, "Request cancelled", REQUEST_CANCELLED)
        with suppress(*CLOSED):
            await self._write_stream.send(session_message(error))

    async def _release_standalone(self) -> None:
        await self.streams.standalone.release()

    # -- GET -----------------------------------------------------------------------------------

    async def get(self, last_event_id: str | None, version: str, responder: Responder) -> None:
        """The standalone stream, or (with ``Last-Event-ID``) the resume of the stream it names."""
        if last_event_id:
            return await self._resume(last_event_id, version, responder)
        standalone = self.streams.standalone
        if standalone.attached:
            error = json_error("Conflict: Only one SSE stream is allowed per session", 409, session=self.session_id)
            return await responder.respond(error)
        preface = b""
        if standalone.ended:
            if standalone.failure is FailureKind.SLOW_CONSUMER:
                preface = encode_error(ErrorCode.SLOW_CONSUMER, "Events of this stream were lost: nobody read them")
            standalone = self._renew_standalone()
        await self._stream(standalone, responder, preface, attachment=standalone.attach())

    def _renew_standalone(self) -> SessionHandler:
        standalone = self.streams.renew_standalone()
        self.session.handler = standalone
        return standalone

    def _stream_headers(self) -> list[tuple[bytes, bytes]]:
        return [*STREAM_HEADERS, (MCP_SESSION_ID_HEADER.encode(), self.session_id.encode())]

    async def _stream(self, stream: SessionHandler, responder: Responder, preface: bytes = b"", **options: Any) -> None:
        await stream_session(
            stream,
            responder.scope,
            responder.receive,
            responder.send,
            preface,
            headers=self._stream_headers(),
            **options,
        )

    def _priming(self, stream: SessionHandler, token: str) -> bytes:
        """The event a 2025-11-25 client gets first on a response stream: an id (the position
        ``token``) and ``retry``, no data, so a cut before anything else still resumes."""
        return encode_event(
            b"", id=format_event_id(stream.session_id, token, stream.secret), retry=self._config.retry_ms
        )

    async def _resume(self, last_event_id: str, version: str, responder: Responder) -> None:
        parsed = parse_event_id(last_event_id)
        stream = self.streams.find(parsed.session_id) if parsed is not None else None
        try:
            known = (
                parsed is not None
                and stream is not None
                and secret_matches(parsed.secret, stream.secret)
                and await self._store.replay(stream.session_id, parsed.token, until=parsed.token) is not None
            )
        except StoreError as exc:
            logger.warning("session %s: resume refused: %s", self.tag, exc)
            return await responder.respond(json_error("Session store unavailable", 503, session=self.session_id))
        if not known:
            logger.info("session %s: refused a resume: Last-Event-ID names no stream of the session", self.tag)
            error = json_error(
                "Unknown or expired Last-Event-ID", 400, ErrorCode.RESUME_UNKNOWN, session=self.session_id
            )
            return await responder.respond(error)
        assert parsed is not None and stream is not None
        if stream is self.streams.standalone and stream.ended:
            stream = self._renew_standalone()  # the same log goes on: the resume replays from it
        if stream.ended:
            return await self._replay_ended(stream, parsed.token, responder)
        logger.info("session %s: resuming a stream", self.tag)
        # As stock, a resumed stream is primed again: the client learns it is back in place.
        preface = self._priming(stream, parsed.token) if primes_streams(version) else b""
        await self._stream(stream, responder, preface, after=parsed.token)

    async def _replay_ended(self, stream: SessionHandler, after: str, responder: Responder) -> None:
        """A stream that ended (answered, or cut loose) replays what the client missed, then ends."""
        config = self._config
        sink = await open_stream(responder.send, responder.scope, config.socket_send_buffer, self._stream_headers())
        prefix = event_id_prefix(stream.session_id, stream.secret)
        written = True
        try:
            async for chunk, _, _ in replay_chunks(self._store, stream.session_id, prefix, after):
                if not await write_within(sink, chunk, config.write_timeout):
                    written = False
                    break
        except StoreError as exc:
            logger.warning("session %s: could not replay (%s)", self.tag, exc)
            written = False
        if written and stream.epilogue is not None:  # cut loose before its answer: this is it
            written = await write_within(sink, stream.epilogue, config.write_timeout)
        await end_stream(responder.scope, responder.send, written, config.write_timeout)
